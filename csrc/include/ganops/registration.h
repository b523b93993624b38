// One registration idiom for every op's kernels: the line after a kernel's definition
// registers it,
//   GANOPS_KERNEL(CPU, "interpolate", interpolate_cpu)
// naming the dispatch key it serves and the op it implements (its schema is in
// csrc/<op>/<op>.cpp). The op, the device and the function read together, and each file
// registers exactly the kernels it defines.
#pragma once

#include <torch/library.h>

#define GANOPS_KERNEL(KEY, OP, FN) \
  TORCH_LIBRARY_IMPL(ganops, KEY, m) { m.impl(OP, &FN); }
