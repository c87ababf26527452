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
	build-essential python3-dev cython3 python3-setuptools \
	python3-pydbus python3-gi python3-systemd python3-openssl python3-cryptography \
	python3-configobj python3-daemon python3-seccomp \
	python3-pytest python3-hypothesis python3-numpy python3-matplotlib \
	dbus systemd-container mmdebstrap iproute2 \
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

bench: build
	$(PYTHON) -m bench

clean:
	rm -rf build dist src/*.egg-info cython/seccomp_loader.c .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	find src -name '*.so' -delete
