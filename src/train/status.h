// The training server's status page: Prometheus' text exposition format at /metrics and a small HTML
// page listing the runs at /, from what the TCP server and the training server count.
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include "train/session.h"
#include "wire/status_http.h"

namespace amaq::train {

struct StatusSnapshot {
  TrainServer::Status train;
  std::map<std::string, uint64_t> refusals;  ///< connections refused before a session, by cause
  uint64_t sessions_started = 0, sessions_failed = 0;
  int64_t sessions_live = 0;
  uint64_t resident_bytes = 0;  ///< the process's RSS
};

/// What `srv` and the TCP server in front of it count now.
StatusSnapshot status_snapshot(TrainServer& srv, const wire::Server& server);
std::string prometheus_text(const StatusSnapshot& s);
std::string status_html(const StatusSnapshot& s);
/// "/metrics", "/" (anything else: 404).
wire::HttpResponse status_response(const std::string& path, const StatusSnapshot& s);

}  // namespace amaq::train
