// CUTLASS results in the words the binding reports, shared by both kernel families.
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace fastres {

// "" when can_implement accepted the problem, else why not.
inline std::string can_implement_reason(cutlass::Status status) {
  if (status == cutlass::Status::kSuccess) return "";
  return std::string("CUTLASS can_implement rejected the problem: ") + cutlass::cutlassGetStatusString(status);
}

// "" when initialize + run succeeded and the launch left no CUDA error, else the error.
inline std::string launch_result(cutlass::Status status) {
  if (status != cutlass::Status::kSuccess) {
    return std::string("CUTLASS conv failed: ") + cutlass::cutlassGetStatusString(status);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("CUDA error after the CUTLASS conv launch: ") + cudaGetErrorString(err);
  return "";
}

}  // namespace fastres
