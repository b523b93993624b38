// Module init for ganops._C_cuda, the CUDA kernels (csrc/<op>/<op>_cuda.cu), registered as
// ganops._C's are. A module of its own, loaded only beside a torch built for the CUDA major
// version it was compiled with (ganops/_ext.py), so that ganops._C loads beside any torch,
// a CPU-only one included.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_cuda", "ganops CUDA kernels (registered as torch.ops.ganops.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
