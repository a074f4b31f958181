# Developer entry points; CI runs .ci/run (make lint, make test). Everything runs from .venv,
# which scripts/setup.sh creates (and installs the Debian packages the tests need).
VENV   := .venv
PYTHON := $(VENV)/bin/python
# Extra pytest arguments, e.g. make test PYTEST_ARGS='-k harness -x'
PYTEST_ARGS ?=

.PHONY: all venv test lint demo bench clean install

all: lint test

venv:
	scripts/setup.sh

test: venv
	$(PYTHON) -m pytest -q -ra $(PYTEST_ARGS) tests

lint: venv
	$(VENV)/bin/ruff check neurond tests bench scripts
	$(VENV)/bin/mypy --strict neurond

demo: venv
	scripts/demo.sh

# Benchmarks are run by hand and never assert on timings.
bench: venv
	@set -e; found=; for f in bench/*.py; do \
		[ -e "$$f" ] || continue; found=1; echo "== $$f"; $(PYTHON) "$$f"; \
	done; [ -n "$$found" ] || echo "no benchmarks in bench/"

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
	rm -rf *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Lays the installed tree (what the Arch package ships) under DESTDIR.
DESTDIR ?=
PREFIX  ?= /usr
# The owner rules (polkit/70-neurond-owner.rules) are an example unless a distribution asks for
# them: OWNER_RULES=1 makes them active in polkit's vendor rules.d (docs/security.md).
OWNER_RULES ?=
install:
	$(PYTHON) -m pip install --quiet --ignore-installed --no-deps --no-build-isolation --root "$(DESTDIR)/" --prefix "$(PREFIX)" .
	install -Dm644 systemd/neurond.service "$(DESTDIR)$(PREFIX)/lib/systemd/system/neurond.service"
	install -Dm644 dbus/org.neuronos.Neuron1.conf "$(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.neuronos.Neuron1.conf"
	install -Dm644 dbus/org.neuronos.Neuron1.service "$(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.neuronos.Neuron1.service"
	install -Dm644 dbus/org.neuronos.Neuron1.xml "$(DESTDIR)$(PREFIX)/share/dbus-1/interfaces/org.neuronos.Neuron1.xml"
	install -Dm644 polkit/org.neuronos.neuron1.policy "$(DESTDIR)$(PREFIX)/share/polkit-1/actions/org.neuronos.neuron1.policy"
	install -Dm644 polkit/70-neurond-owner.rules "$(DESTDIR)$(PREFIX)/share/doc/neurond/examples/70-neurond-owner.rules"
	if [ -n "$(OWNER_RULES)" ]; then install -Dm644 polkit/70-neurond-owner.rules "$(DESTDIR)$(PREFIX)/share/polkit-1/rules.d/70-neurond-owner.rules"; fi
	install -Dm644 packaging/neurond.toml "$(DESTDIR)/etc/neurond/neurond.toml"
	install -Dm644 systemd/neurond.catalog "$(DESTDIR)$(PREFIX)/lib/systemd/catalog/neurond.catalog"
	install -Dm644 README.md "$(DESTDIR)$(PREFIX)/share/doc/neurond/README.md"
