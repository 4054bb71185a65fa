module github.com/ephysd/ephysd

go 1.26.8

require (
	github.com/creack/pty v1.1.24
	github.com/google/gousb v1.1.3
	github.com/pelletier/go-toml/v2 v2.2.4
	go.bug.st/serial v1.6.2
	go.uber.org/zap v1.27.0
	golang.org/x/sys v0.31.0
	golang.org/x/term v0.30.0
)

require (
	github.com/coreos/go-systemd/v22 v22.5.0 // indirect
	github.com/creack/goselect v0.1.2 // indirect
	go.uber.org/multierr v1.10.0 // indirect
)
