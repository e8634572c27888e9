// SPDX-License-Identifier: BSD-3-Clause
// The current-form test device, compiled as C++ by meson.
#include "api2026.c"
