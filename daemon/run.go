package daemon

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// stopTimeout bounds a clean shutdown: finishing the blocks in flight,
// finalising the recording, closing the devices.
const stopTimeout = 20 * time.Second

// runCommand is `ephysd run`: the daemon. It starts in the configured mode
// (IDLE by default), serves the control API and the CLI socket, and runs
// until SIGINT/SIGTERM, PUT /api/quit or --duration; then it stops
// recording (files finalised) and acquisition and exits 0.
func runCommand(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("ephysd run", stderr)
	configPath := fs.String("config", "", "configuration file (TOML); none: the simulated headstage, no Python stage, IDLE")
	durationFlag := fs.String("duration", "", "stop after this long (default: until SIGINT/SIGTERM or /api/quit)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("run: unexpected argument %q", fs.Arg(0))}
	}
	duration, err := parseDuration("duration", *durationFlag)
	if err != nil {
		return err
	}
	var cfg *Config
	if *configPath != "" {
		if *configPath, err = filepath.Abs(*configPath); err != nil {
			return err
		}
		cfg, err = LoadConfig(*configPath)
	} else {
		wd, _ := os.Getwd()
		cfg, err = ParseConfig(filepath.Join(wd, "(built-in defaults)"), nil)
	}
	if err != nil {
		return err
	}
	log, err := NewLogger(cfg.Log.Level, cfg.Log.Format, stderr)
	if err != nil {
		return err
	}
	defer log.Sync()
	t0 := time.Now()
	recoverAtStart(cfg, log)

	ctx, cancel := signalContext()
	defer cancel()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	if cfg.Realtime.LockMemory {
		lockMemory(log)
	}
	notify := NewNotifier(log)
	notify.Status("starting")
	svc, err := NewService(cfg, log)
	if err != nil {
		return err
	}
	// The watchdog runs from the start: IDLE is healthy, and while
	// acquiring only a pipeline that delivers blocks is.
	go notify.RunWatchdog(ctx, svc.Healthy)
	if err := svc.CheckSource(); err != nil {
		return err
	}
	quit := make(chan struct{}, 1)
	control, err := NewControl(svc, log, ControlOptions{
		ConfigPath: *configPath,
		Metrics:    NewMetrics(svc).Handler(),
		Quit: func() {
			select {
			case quit <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		return err
	}
	defer control.Close()

	start, _ := ParseMode(cfg.Control.StartMode)
	if err := svc.SetMode(start); err != nil {
		svc.Close()
		return err
	}
	if err := waitFirstBlock(svc, 30*time.Second); err != nil {
		svc.Close()
		return err
	}
	notify.Ready()
	log.Info("ephysd ready", zap.String("mode", string(svc.Mode())), zap.Duration("startup", time.Since(t0)),
		zap.String("http", cfg.Control.HTTP), zap.String("socket", control.SocketPath()))

	var timer <-chan time.Time
	if duration > 0 {
		timer = time.After(duration)
	}
	var progress func()
	if svc.Mode() != Idle {
		progress = startProgress(svc.Chain(), stderr)
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	reason := ""
	for reason == "" {
		notify.Status(systemdStatus(svc))
		select {
		case <-ctx.Done():
			reason = "signal"
		case <-quit:
			reason = "quit requested through the API"
		case <-timer:
			reason = "duration reached"
		case <-hup:
			notify.Status("reloading")
			notes, err := svc.Reload(*configPath)
			if err != nil {
				log.Error("reload failed", zap.Error(err))
			} else {
				log.Info("configuration and Python modules reloaded", zap.String("notes", notes))
			}
		case <-svc.Ended():
			log.Warn("acquisition ended by itself; waiting in IDLE", zap.String("reason", svc.LastError()))
		case <-tick.C:
		}
	}
	if progress != nil {
		progress()
	}
	notify.Stopping()
	log.Info("stopping", zap.String("reason", reason))
	control.Close() // nothing may change the mode while stopping
	chain := svc.Chain()
	done := make(chan error, 1)
	go func() { done <- svc.Close() }()
	select {
	case err = <-done:
	case <-time.After(stopTimeout):
		return fmt.Errorf("stop: the pipeline did not finish within %s (a Python stage may be blocked); the recording on disk is readable up to its last checkpoint", stopTimeout)
	}
	if chain != nil {
		printSummary(stdout, chain)
	}
	return err
}

// waitFirstBlock waits until a block has gone through the pipeline (when
// acquiring), so that READY means samples flow.
func waitFirstBlock(svc *Service, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		c := svc.Chain()
		if c == nil || !c.Runner.LastBlock().IsZero() {
			return nil
		}
		select {
		case <-c.Runner.Done():
			return errors.New("acquisition ended before the first block went through the pipeline")
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no block went through the pipeline within %s: is the device sending?", limit)
		}
	}
}

// systemdStatus is the systemd STATUS= text.
func systemdStatus(svc *Service) string {
	st := svc.Status()
	switch {
	case st.RecordingError != "" && st.Pipeline != nil:
		return fmt.Sprintf("%s — recording FAILED: %s", st.Mode, st.RecordingError)
	case st.Pipeline == nil:
		return string(st.Mode)
	case st.Recording != nil:
		return fmt.Sprintf("RECORD %s — %.0f samples/s, %d overruns", st.Recording.Path, st.Pipeline.SamplesPerSec, st.Pipeline.Overruns)
	default:
		return fmt.Sprintf("ACQUIRE — %.0f samples/s, %d overruns", st.Pipeline.SamplesPerSec, st.Pipeline.Overruns)
	}
}
