// Module init for ganops._C_launch_checks, the test-only extension of the launch checks
// (csrc/<op>/<op>_launch_check.cpp): test ops that replay each CUDA launch on the CPU. They
// are not part of the library: the wheel leaves this extension out, and tests/conftest.py
// imports it where it was built. Each check defines its own test op in the `ganops`
// namespace (GANOPS_LAUNCH_CHECK_OP, csrc/include/ganops/launch_emulation.h).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_launch_checks(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_launch_checks",
      "ganops launch checks, test ops only (registered as torch.ops.ganops._<op>_cuda_launch_check)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
