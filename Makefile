# Shoal — two commands do everything on a fresh Debian machine:
#   make demo   installs what it needs, then runs Shoal's main job end to end
#   make test   installs what it needs, runs the gates (make lint: mypy --strict, ruff, import layers),
#               then the whole test suite (.ci/run calls exactly this)
#   make fuzz   the fuzz harnesses of tests/fuzz with a large budget (see README, Fuzzing)
#   make stress the fault tests (chaos proxy, registry restarts, SIGKILL, gc races) with large counts

VENV    ?= .venv
PY      := $(VENV)/bin/python
SHOAL   := $(VENV)/bin/shoal
APT_PKGS := docker-registry skopeo umoci runc fuse3 podman libfuse3-dev pkg-config debootstrap casync zstd pigz \
            slirp4netns passt squashfs-tools python3-venv attr curl time containerd stargz-snapshotter rpm

.PHONY: demo test fuzz stress bench deps venv clean lint

deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	  echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: deps venv
	PATH=$(abspath $(VENV))/bin:$$PATH ./scripts/demo.sh

# the gates first (seconds): types, style, and the import layers of pyproject.toml [tool.importlinter]
lint: venv
	$(PY) -m mypy --strict src
	$(PY) -m ruff check src tests
	$(VENV)/bin/lint-imports --no-cache

test: deps venv lint
	$(PY) -m pytest -n 2 --timeout=600 tests

# the harnesses of tests/fuzz with a large budget (make test runs them briefly); FUZZ_EXAMPLES per harness
FUZZ_EXAMPLES ?= 20000
fuzz: deps venv
	HYPOTHESIS_PROFILE=fuzz SHOAL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -n 2 --timeout=0 tests/fuzz

# SHOAL_STRESS=N multiplies the stress counts (default 1: 50 pushes + 50 pulls through the chaos proxy,
# 40 kills per command, 10 rounds of concurrent pulls racing gc); SHOAL_CHAOS_SEED=S replays a seed,
# SHOAL_CHAOS_RATE=R sets the share of requests the chaos proxy hits with a fault.
STRESS_TESTS := tests/integration/test_chaos.py tests/functional/test_kill_anywhere.py \
                tests/integration/test_transfer_faults.py tests/functional/test_store_safety.py
stress: deps venv
	SHOAL_STRESS=$${SHOAL_STRESS:-1} $(PY) -m pytest -n 2 --timeout=3600 -rA $(STRESS_TESTS)

bench: deps venv
	for b in build pull series dedup convert lazy fuse_read containerd; do \
	  [ -f bench/$$b.py ] && PATH=$(abspath $(VENV))/bin:$$PATH $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
