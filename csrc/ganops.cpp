// Module init for ganops._C, the C++ CPU kernels.
//
// Importing ganops._C loads this shared library; the static registrars of every
// csrc/<op>/<op>_cpu.cpp then add their kernels to the `ganops` ops (GANOPS_KERNEL), whose
// schemas the registry defines in Python (ganops/_library.py). The module carries nothing
// else: CPython's limited API (abi3) and no pybind11.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ganops C++ CPU kernels (registered as torch.ops.ganops.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
