// Module init for ganops._C and the owner of the `ganops` torch.library namespace.
//
// Importing ganops._C loads this shared library; the static registrars in every
// csrc/<op>/*.cpp and *_cuda.cu then add their schemas (TORCH_LIBRARY_FRAGMENT) and
// kernels (TORCH_LIBRARY_IMPL). The module itself carries nothing else, so no pybind11
// (and none of torch/extension.h's compile time) is needed.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ganops, m) {}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ganops compiled kernels (registered as torch.ops.ganops.*)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
