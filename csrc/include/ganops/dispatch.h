// Dtype dispatch over the four floating types every op supports.
#pragma once

#include <ATen/Dispatch.h>

#define GANOPS_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
