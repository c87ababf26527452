# CPUShare developer entry points.  Debian's interpreter, never a pyenv one:
# the python3-* packages we depend on are only visible to it.
PYTHON      ?= /usr/bin/python3
export PYTHONPATH := $(CURDIR)/src
# Downloads the tests reuse between runs (the mmdebstrap root of the system
# test, a guest kernel): outside the checkout so a fresh clone finds them.
CACHE_DIR   ?= /var/cache/cpushare-dev
export CPUSHARE_CACHE_DIR := $(CACHE_DIR)
PYTEST_ARGS ?=

# Everything the build, the tests, the package and the demo need, from Debian.
DEB_DEPS = \
	build-essential python3-dev python3-all-dev cython3 python3-setuptools libssl-dev \
	python3-pydbus python3-gi python3-systemd python3-openssl python3-cryptography \
	python3-configobj python3-daemon python3-seccomp \
	python3-pytest python3-hypothesis python3-numpy python3-matplotlib python3-pil python3-scipy \
	dbus systemd-container mmdebstrap iproute2 iperf3 vde2 \
	qemu-system-x86 grub-pc-bin grub-common xorriso mtools busybox-static cpio \
	dropbear-bin openssh-client dnsmasq-base nfs-ganesha nfs-ganesha-vfs iptables tcpdump \
	postgresql python3-psycopg \
	debhelper dh-python devscripts lintian fakeroot man-db groff-base

.PHONY: all deps build check test bench demo deb clean

all: build

deps:
	@missing=$$(for p in $(DEB_DEPS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing:" $$missing; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "deps: all installed"; fi

build:
	$(PYTHON) setup.py -q build_ext --inplace --build-lib src

test: build
	$(PYTHON) -m pytest $(PYTEST_ARGS) tests

check: deps build
	$(PYTHON) -m pytest $(PYTEST_ARGS) tests

# make bench [BENCH_ARGS=--quick]: one table; JSON in bench/results/
BENCH_ARGS ?=
bench: build
	$(PYTHON) -m bench $(BENCH_ARGS)

# make demo [IMAGES=10000]: the Floyd-Steinberg study on a local market
IMAGES ?= 1000
demo: deps build
	IMAGES=$(IMAGES) PYTHON=$(PYTHON) bash demo/run.sh

# The Debian packages cpushare and cpushare-server in dist/, built with
# dpkg-buildpackage from a copy of the tree (the checkout stays clean) and
# held to lintian: no error, no warning.  Nothing is rebuilt when dist/ holds
# the packages of exactly this tree (dist/.tree is the digest of what the
# build reads and of DEB_BUILD_OPTIONS: with nocheck, tests/, bench/ and demo/
# are not read, so a change there alone rebuilds nothing); two builds at once
# take turns (build/.deb.lock).
DEB_BUILD_DIR = build/deb
# Debian's tools only: a python3 earlier on PATH (pyenv) must not build it.
DEB_PATH = /usr/sbin:/usr/bin:/sbin:/bin
# "make check" runs the test suite on this same tree, so the package build
# skips its copy of it; "make deb DEB_BUILD_OPTIONS=" runs it there too.
DEB_BUILD_OPTIONS ?= nocheck
export DEB_BUILD_OPTIONS
deb:
	@set -e; mkdir -p build; exec 9>build/.deb.lock; flock 9; \
	files=$$(git ls-files -co --exclude-standard --deduplicate | while IFS= read -r f; do [ -f "$$f" ] && echo "$$f"; done; true); \
	case " $$DEB_BUILD_OPTIONS " in \
	    *" nocheck "*) inputs=$$(echo "$$files" | grep -Ev '^(tests|bench|demo)/' || true) ;; \
	    *) inputs=$$files ;; esac; \
	tree=$$({ echo "DEB_BUILD_OPTIONS=$$DEB_BUILD_OPTIONS"; \
	    echo "$$inputs" | LC_ALL=C sort | xargs -d '\n' sha256sum; } | sha256sum | cut -c1-32); \
	if [ "$$(cat dist/.tree 2>/dev/null)" = "$$tree" ] && ls dist/cpushare_*.deb dist/cpushare-server_*.deb >/dev/null 2>&1; then \
	    echo "deb: dist/ holds the packages of this tree"; exit 0; fi; \
	rm -rf $(DEB_BUILD_DIR); mkdir -p $(DEB_BUILD_DIR)/cpushare; \
	echo "$$files" | tar -cf - -T - | tar -xf - -C $(DEB_BUILD_DIR)/cpushare; \
	(cd $(DEB_BUILD_DIR)/cpushare && env -u PYTHONPATH PATH=$(DEB_PATH) dpkg-buildpackage -us -uc -b); \
	mkdir -p dist; rm -f dist/*.deb dist/.tree; cp $(DEB_BUILD_DIR)/*.deb dist/; \
	lintian --fail-on error,warning $(DEB_BUILD_DIR)/*.changes; \
	echo "$$tree" > dist/.tree; ls -l dist/*.deb

clean:
	rm -rf build dist src/*.egg-info cython/seccomp_loader.c .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	find src -name '*.so' -delete
