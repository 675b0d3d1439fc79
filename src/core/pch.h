// Precompiled header shared by every target: the heavy, stable headers only.
#pragma once
#include <ATen/ATen.h>
#include <torch/types.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <nlohmann/json.hpp>
#include <fmt/format.h>
#include <map>
#include <memory>
#include <string>
#include <vector>
