# ephysd — build, run and test. `make run` and `make test` install what is
# missing first (Debian packages, non-interactively; as root directly,
# otherwise through sudo).

GO      ?= go
BIN     := bin/ephysd
PREFIX  ?= /usr/local
CONFIG  ?= examples/ephysd.toml

# Debian 12 packages the build and the tests need: cgo and libpython for the
# embedded interpreter, numpy/scipy for the example modules, neo to read
# recordings back in the tests, systemd for systemd-analyze and
# systemd-sysusers (the unit's tests; a CI container has no systemd).
DEB_PACKAGES := gcc pkg-config libpython3.11-dev python3-numpy python3-scipy python3-neo \
                libusb-1.0-0-dev umockdev systemd

.PHONY: all deps build run test bench soak install uninstall clean

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

# govulncheck (pinned, from the Go module proxy) fails the tests when code
# ephysd calls has a known vulnerability; tools/vulncheck.sh says which
# database it checked against (vuln.go.dev, or EPHYSD_VULNDB), and prints
# NOT CHECKED when it could reach none (EPHYSD_VULNCHECK_REQUIRED=1 makes
# that fail).
test: deps
	$(GO) vet ./...
	GO=$(GO) bash tools/vulncheck.sh
	$(GO) test -race -count=1 -timeout 12m ./...
	$(GO) test -count=1 -timeout 5m -run 'TestBenchLatencyShort' ./daemon

# Prints performance figures and records the suite's in docs/PERFORMANCE.md
# (ephysd bench: < 10 minutes; `./bin/ephysd bench --long` for the full
# 60 s throughput probes and 10000 latency events).
bench: build
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./...
	./$(BIN) bench --write-doc docs/PERFORMANCE.md --png docs/latency.png

# The long reliability runs. First every test with EPHYSD_LONG_TESTS=1,
# which the reliability tests read to run their long versions (more
# kill/recover trials, longer hang and hang-up loops); without the race
# detector, which `make test` runs. Then `ephysd soak` for DURATION: the
# daemon on 384 simulated channels × 30 kHz through the band-pass filter,
# recording, its API polled every 100 ms; it prints overruns, gaps, RSS
# drift, goroutines/threads/files, CPU, writes the figures into
# docs/RELIABILITY.md and fails if a goal is missed. `make soak DURATION=60m`
# for the hour the docs quote.
DURATION ?= 10m

soak: build
	EPHYSD_LONG_TESTS=1 $(GO) test -count=1 -timeout 90m ./...
	./$(BIN) soak --duration $(DURATION) --write-doc docs/RELIABILITY.md

# Installs the service: the binary, the systemd unit, the service user
# (sysusers.d), the serial drivers to load at boot (modules-load.d), the udev
# rules, and the example configuration /etc/ephysd/ephysd.toml unless that
# file exists. Honours DESTDIR (staging, packaging) and PREFIX (the binary;
# the unit's ExecStart follows it). The unit goes to /etc/systemd/system: this
# is a local install, and /lib/systemd/system belongs to dpkg. With DESTDIR
# empty it also creates the user, reloads udev and systemd; it never enables
# or starts the service (systemctl enable --now ephysd).
UNITDIR     := /etc/systemd/system
SYSUSERSDIR := /usr/lib/sysusers.d
MODLOADDIR  := /usr/lib/modules-load.d
UDEVDIR     := /etc/udev/rules.d

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/ephysd
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/local/bin/ephysd|$(PREFIX)/bin/ephysd|g' systemd/ephysd.service >$(DESTDIR)$(UNITDIR)/ephysd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/ephysd.service
	install -D -m 0644 systemd/ephysd.sysusers $(DESTDIR)$(SYSUSERSDIR)/ephysd.conf
	install -D -m 0644 systemd/ephysd-modules.conf $(DESTDIR)$(MODLOADDIR)/ephysd.conf
	install -D -m 0644 systemd/99-ephysd.rules $(DESTDIR)$(UDEVDIR)/99-ephysd.rules
	@if [ -e $(DESTDIR)/etc/ephysd/ephysd.toml ]; then \
	  echo "kept $(DESTDIR)/etc/ephysd/ephysd.toml (the example is systemd/ephysd.toml)"; \
	else \
	  install -D -m 0644 systemd/ephysd.toml $(DESTDIR)/etc/ephysd/ephysd.toml; \
	fi
	@if [ -z "$(DESTDIR)" ]; then \
	  if command -v systemd-sysusers >/dev/null 2>&1; then systemd-sysusers $(SYSUSERSDIR)/ephysd.conf; \
	  else echo "make: systemd-sysusers not found: create user ephysd (groups dialout, plugdev) yourself" >&2; fi; \
	  modprobe -a usbserial ftdi_sio cdc_acm 2>/dev/null || true; \
	  if command -v udevadm >/dev/null 2>&1; then udevadm control --reload || true; fi; \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi
	@echo "installed $(DESTDIR)$(PREFIX)/bin/ephysd, $(DESTDIR)$(UNITDIR)/ephysd.service, $(DESTDIR)$(SYSUSERSDIR)/ephysd.conf,"
	@echo "  $(DESTDIR)$(MODLOADDIR)/ephysd.conf, $(DESTDIR)$(UDEVDIR)/99-ephysd.rules"
	@echo "next: edit /etc/ephysd/ephysd.toml, replug USB devices (or udevadm trigger), systemctl enable --now ephysd"

# Removes what install put in place, except /etc/ephysd (the configuration),
# /var/lib/ephysd (the recordings) and the ephysd user (its files remain):
# remove those by hand if you mean to.
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl disable --now ephysd.service 2>/dev/null || true; fi
	rm -f $(DESTDIR)$(PREFIX)/bin/ephysd $(DESTDIR)$(UNITDIR)/ephysd.service \
	      $(DESTDIR)$(SYSUSERSDIR)/ephysd.conf $(DESTDIR)$(MODLOADDIR)/ephysd.conf $(DESTDIR)$(UDEVDIR)/99-ephysd.rules
	@if [ -z "$(DESTDIR)" ]; then \
	  if command -v udevadm >/dev/null 2>&1; then udevadm control --reload || true; fi; \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi
	@echo "left in place: $(DESTDIR)/etc/ephysd (configuration), $(DESTDIR)/var/lib/ephysd (recordings) and user ephysd"

clean:
	rm -rf bin
