// One registration idiom for every op's kernels: the line after a kernel's definition
// registers it,
//   GANOPS_KERNEL(CPU, "interpolate", interpolate_cpu)
// naming the dispatch key it serves and the op it implements. Schemas are not written here:
// each op's schema is declared once, in its hub's registry entry (ganops/_library.py), which
// defines it; the C++ only implements it (the dispatcher takes an implementation before its
// definition). The op, the device and the function read together, and each file registers
// exactly the kernels it defines. Kernels are boxed (TORCH_BOX), as the stable ABI calls them.
#pragma once

#include <torch/csrc/stable/library.h>

#define GANOPS_KERNEL(KEY, OP, FN) \
  STABLE_TORCH_LIBRARY_IMPL(ganops, KEY, m) { m.impl(OP, TORCH_BOX(&FN)); }
