// Dtype dispatch over the four floating types every op supports: the body, a lambda, sees
// the element type as scalar_t (stable-ABI headers, torch/headeronly).
#pragma once

#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>

#define GANOPS_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                 \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                       \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))

// float32 and float64 only: the accumulation dtypes (a norm, a clip coefficient).
#define GANOPS_DISPATCH_FLOAT_DOUBLE(TYPE, NAME, ...)                                    \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                       \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__))
