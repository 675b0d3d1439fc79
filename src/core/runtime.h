// Process-wide runtime settings.
#pragma once

namespace amaq {

/// Sets torch's intra-op thread count; `threads <= 0` means one per core. Returns the count used.
int configure_threads(int threads);

}  // namespace amaq
