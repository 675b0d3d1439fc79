// The parsers of JSON that comes from a peer or a run directory: what they accept round-trips,
// and every bad field is refused with an error that names it (floats where integers belong too:
// converting 1e300 to int64 would be undefined behaviour, found by the fuzzer).
#include "train/options.h"

#include <gtest/gtest.h>

#include "core/json.h"
#include "testing.h"

namespace amaq::train {
namespace {

ScheduleRequest request() {
  ScheduleRequest r;
  r.run_id = "0123456789abcdef";
  r.resume_step = 5;
  r.batch = 4;
  r.seq_len = 64;
  r.schedule.steps = 10;
  r.schedule.warmup = 2;
  r.schedule.seed = 7;
  return r;
}

TEST(ScheduleRequest, RoundTripsAndRefusesEachBadFieldByName) {
  const ScheduleRequest back = ScheduleRequest::from_json(request().to_json());
  EXPECT_EQ(back.to_json(), request().to_json());

  auto with = [](const char* key, nlohmann::json v) {
    nlohmann::json j = request().to_json();
    j[key] = std::move(v);
    return j;
  };
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(with("batch", 1e300)), "\"batch\" must be an integer");
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(with("resume_step", -7)), "resume_step");
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(with("run_id", "../../etc")), "run_id");
  nlohmann::json overflow = with("batch", int64_t{1} << 33);
  overflow["seq_len"] = int64_t{1} << 31;  // their product wraps to 0 in int64
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(overflow), "batch x seq_len");
  nlohmann::json steps = request().to_json();
  steps["schedule"]["steps"] = 2.5;
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(steps), "\"steps\" must be an integer");
  steps["schedule"]["seed"] = -1;
  steps["schedule"]["steps"] = 10;
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(steps), "\"seed\"");
}

TEST(RunFiles, DamagedRunAndStateFilesAreNamed) {
  EXPECT_EQ(parse_run_file(R"({"run_id": "0123456789abcdef", "split": 2})", "r/run.json"), "0123456789abcdef");
  for (const char* bad : {"", "{", "[]", R"({"run_id": 5})", R"({"run_id": "../up"})"})
    EXPECT_AMAQ_ERROR(parse_run_file(bad, "r/run.json"), "r/run.json is damaged");
  EXPECT_EQ(parse_state_file(R"({"step": 3, "position": 12})", "c/state.json")["step"], 3);
  for (const char* bad : {"", "null", R"({"step": "3"})", R"({"step": 3.5})", R"({"step": -1})"})
    EXPECT_AMAQ_ERROR(parse_state_file(bad, "c/state.json"), "c/state.json is damaged");
  EXPECT_EQ(json_int<uint8_t>(nlohmann::json{{"k", 255}}, "k"), 255);
  EXPECT_AMAQ_ERROR(json_int<uint8_t>(nlohmann::json{{"k", 256}}, "k"), "\"k\" must be an integer in [0, 255]");
}

}  // namespace
}  // namespace amaq::train
