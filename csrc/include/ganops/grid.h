// CUDA grid limits, checked on the host before a launch. The CUDA host code and its launch
// check (csrc/<op>/<op>_launch_check.cpp) call the same check with the same sizes, so a CPU
// test shows the error a GPU would give instead of "invalid configuration argument".
#pragma once

#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <string_view>

namespace ganops {

// gridDim.x's limit on every architecture ganops builds for (compute capability >= 3.0).
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

// blocks for a 1-D grid, checked against kMaxGridX; `launch` names the kernel's op.
inline unsigned int grid_x(int64_t blocks, std::string_view launch) {
  STD_TORCH_CHECK(blocks <= kMaxGridX, launch, ": the CUDA launch would need ", blocks,
              " blocks, past CUDA's limit of 2^31 - 1 blocks on a 1-D grid; split the input");
  return static_cast<unsigned int>(blocks);
}

}  // namespace ganops
