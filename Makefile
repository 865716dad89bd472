# The two commands of the README: `make start` and `make test`. Everything else is a helper.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/setup_env.sh | cksum | cut -d' ' -f1)

.PHONY: start test setup setup-dev browser stop status lint bench clean-venv

start: setup  ## set everything up and start the daemon (and the Tavern) on this realm
	$(PY) -m training start-all
	@sleep 3; $(PY) -m training status

test: setup-dev browser  ## set up and run the whole test suite
	$(PY) -m pytest -q -p no:cacheprovider

setup: $(STAMP)
$(STAMP):
	bash scripts/setup_env.sh $(VENV) dev
	@rm -f $(VENV)/.installed-*; touch $@

setup-dev: setup

browser:
	@bash scripts/install_browser.sh

stop:
	$(PY) -m training stop-all

status:
	$(PY) -m training status

lint: setup-dev
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
