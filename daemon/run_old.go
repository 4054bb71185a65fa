package daemon

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Temporary: the pre-service run command, until the service wiring lands.
func runCommand(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ephysd run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "configuration file (TOML)")
	durationFlag := fs.String("duration", "", "stop after this long (default: until SIGINT/SIGTERM)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *configPath == "" {
		return usageError{errors.New("run: --config FILE is required (try examples/ephysd.toml)")}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("run: unexpected argument %q", fs.Arg(0))}
	}
	duration, err := parseDuration("duration", *durationFlag)
	if err != nil {
		return err
	}
	cfg, err := LoadConfig(*configPath)
	if err != nil {
		return err
	}
	log, err := NewLogger(cfg.Log.Level, cfg.Log.Format, stderr)
	if err != nil {
		return err
	}
	defer log.Sync()

	ctx, cancel := signalContext()
	defer cancel()

	chain, err := NewChain(cfg, log)
	if err != nil {
		return err
	}
	if err := chain.Start(); err != nil {
		chain.Stop()
		return err
	}
	if cfg.Recording.RecordOnStart == nil || *cfg.Recording.RecordOnStart {
		if _, err := chain.StartRecording(); err != nil {
			chain.Stop()
			return err
		}
	}
	var timer <-chan time.Time
	if duration > 0 {
		timer = time.After(duration)
	}
	stopProgress := startProgress(chain, stderr)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reason := ""
	for reason == "" {
		select {
		case <-ctx.Done():
			reason = "signal"
		case <-timer:
			reason = "duration reached"
		case <-chain.Runner.Done():
			reason = "source ended"
		case <-hup:
			chain.ReloadStages()
		}
	}
	stopProgress()
	log.Info("stopping", zap.String("reason", reason))
	runErr := chain.Stop()
	printSummary(stdout, chain)
	return runErr
}
