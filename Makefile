# ephysd — build, run and test. `make run` and `make test` install what is
# missing first (Debian packages, non-interactively; as root directly,
# otherwise through sudo).

GO      ?= go
BIN     := bin/ephysd
PREFIX  ?= /usr/local
CONFIG  ?= examples/ephysd.toml

# Debian 12 packages the build and the tests need: cgo and libpython for the
# embedded interpreter, numpy/scipy for the example modules, neo to read
# recordings back in the tests.
DEB_PACKAGES := gcc pkg-config libpython3-dev python3-numpy python3-scipy python3-neo \
                libusb-1.0-0-dev umockdev

.PHONY: all deps build run test bench soak install clean

all: build

deps:
	@command -v $(GO) >/dev/null 2>&1 || { echo "make: Go is not installed (ephysd needs Go 1.26 or newer on PATH)" >&2; exit 1; }
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || \
	  { echo "make: could not install$$missing — install them with apt-get and try again" >&2; exit 1; }; \
	fi

build: deps
	$(GO) build -o $(BIN) ./cmd/ephysd

# Runs the daemon on the simulated headstage with the example module,
# recording into ./recordings, until Ctrl-C.
run: build
	./$(BIN) run --config $(CONFIG)

test: deps
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 12m ./...

# Prints performance figures (see docs/performance.md).
bench: build
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./...
	./$(BIN) bench

soak: build
	./$(BIN) process --source sim --channels 384 --realtime --module examples/bandpass_filter.py --out $${TMPDIR:-/tmp}/ephysd-soak --duration 10m

# Installs the binary and the udev rules. The systemd unit comes with the
# service work; this target says so rather than pretending.
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/ephysd
	install -D -m 0644 systemd/99-ephysd.rules $(DESTDIR)/etc/udev/rules.d/99-ephysd.rules
	@if [ -z "$(DESTDIR)" ] && command -v udevadm >/dev/null 2>&1; then udevadm control --reload || true; fi
	@echo "installed $(DESTDIR)$(PREFIX)/bin/ephysd and $(DESTDIR)/etc/udev/rules.d/99-ephysd.rules"
	@echo "note: no systemd unit is installed yet (it comes with the service work)"

clean:
	rm -rf bin
