module github.com/ephysd/ephysd

go 1.26.8

require (
	github.com/pelletier/go-toml/v2 v2.2.4 // indirect
	go.uber.org/multierr v1.10.0 // indirect
	go.uber.org/zap v1.27.0 // indirect
	golang.org/x/sys v0.31.0 // indirect
	golang.org/x/term v0.30.0 // indirect
)
