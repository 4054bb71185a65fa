// Package daemon is ephysd's top: configuration, the wiring of drivers →
// pipeline → recording, and the commands of the ephysd binary.
package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/term"

	// Drivers register themselves.
	_ "github.com/ephysd/ephysd/drivers/firmata"
	"github.com/ephysd/ephysd/drivers/ftdi"
	_ "github.com/ephysd/ephysd/drivers/openbci"
	_ "github.com/ephysd/ephysd/drivers/playback"
	_ "github.com/ephysd/ephysd/drivers/pulsepal"
	_ "github.com/ephysd/ephysd/drivers/sim"
	_ "github.com/ephysd/ephysd/drivers/spikerbox"
	"github.com/ephysd/ephysd/drivers/stream"
	"github.com/ephysd/ephysd/drivers/usb/gousbdev"
)

func init() {
	// The USB drivers reach devices through libusb in this binary.
	USBOpener = gousbdev.Opener{}
	ftdi.USBOpener = gousbdev.Opener{}
	stream.Opener = gousbdev.Opener{}
}

// Version is set at build time (-ldflags "-X github.com/ephysd/ephysd/daemon.Version=…").
var Version = "dev"

const usage = `ephysd — closed-loop electrophysiology daemon

Usage:
  ephysd run --config FILE [--duration D]
      Acquire from the configured source through the Python stages and record
      until SIGINT/SIGTERM (or for D, e.g. 30s, 10m), then finalise cleanly.

  ephysd process --source sim|playback:DIR --module FILE [--module FILE …] --out DIR
                 [--channels N] [--rate HZ] [--duration D] [--realtime] [--block-ms MS]
      Run Python modules over a simulated or recorded session as fast as possible,
      write an Open Ephys recording into DIR and print a summary.

  ephysd recover DIR...
      Make the recordings at or below each DIR consistent after a crash, kill,
      power cut or full disk (ephysd run does it at start for its own folders);
      print what was fixed. Exit status 1 if a recording could not be fixed.

  ephysd devices
      List the serial ports and USB devices ephysd recognises, the driver that
      would take each, and whether this user may open it.

  ephysd bench [--quick|--long] [latency|throughput|python|recorder|footprint|calls|isolation|all]
      The performance suite: closed-loop latency, throughput search, Python
      overhead, recorder rate, footprint; prints tables (see docs/PERFORMANCE.md).

  ephysd soak [--duration 10m] [--channels 384] [--module FILE] [--write-doc FILE]
      Run the daemon (a child) on the simulated headstage through the module,
      recording, polling its API; report overruns, gaps, RSS drift, goroutines,
      threads, files and CPU, and exit 1 if a goal is missed (docs/RELIABILITY.md).

  ephysd version
`

// Main runs the ephysd command line and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) < 1 {
		fmt.Fprint(stderr, usage+ClientUsage)
		return 2
	}
	if main, ok := hiddenCommands[args[0]]; ok {
		return main(args[1:], stdout, stderr)
	}
	var err error
	switch args[0] {
	case "run":
		err = runCommand(args[1:], stdout, stderr)
	case "process":
		err = processCommand(args[1:], stdout, stderr)
	case "bench":
		err = benchCommand(args[1:], stdout, stderr)
	case "soak":
		err = soakCommand(args[1:], stdout, stderr)
	case "devices":
		err = devicesCommand(args[1:], stdout, stderr)
	case "recover":
		err = recoverCommand(args[1:], stdout, stderr)
	case "status", "acquire", "record", "stop", "idle", "message", "reload", "stages":
		err = clientCommand(args[0], args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintf(stdout, "ephysd %s\n", Version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage+ClientUsage)
	default:
		fmt.Fprintf(stderr, "ephysd: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "ephysd: %v\n", err)
			return 2
		}
		fmt.Fprintf(stderr, "ephysd: %v\n", err)
		return 1
	}
	return 0
}

type usageError struct{ error }

// NewLogger makes the daemon's logger on w (stderr). Format "auto" picks:
// under systemd's journal, lines without a timestamp (the journal has one)
// that start with the syslog priority (<3> error … <7> debug); on a
// terminal, readable console lines; otherwise JSON. "console" and "json"
// force a format.
func NewLogger(level, format string, w io.Writer) (*zap.Logger, error) {
	var lvl zapcore.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	if format == "" || format == "auto" {
		switch {
		case underJournal(w):
			format = "journal"
		case isTerminal(w):
			format = "console"
		default:
			format = "json"
		}
	}
	ec := zap.NewProductionEncoderConfig()
	ec.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch format {
	case "json":
		enc = zapcore.NewJSONEncoder(ec)
	case "journal":
		ec.TimeKey = ""
		ec.EncodeLevel = journalPriority
		enc = zapcore.NewConsoleEncoder(ec)
	default:
		ec.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(ec)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), lvl)), nil
}

// journalPriority writes the syslog priority prefix systemd-journald reads
// at the start of a line.
func journalPriority(l zapcore.Level, enc zapcore.PrimitiveArrayEncoder) {
	switch {
	case l >= zapcore.ErrorLevel:
		enc.AppendString("<3>")
	case l == zapcore.WarnLevel:
		enc.AppendString("<4>")
	case l == zapcore.InfoLevel:
		enc.AppendString("<6>")
	default:
		enc.AppendString("<7>")
	}
}

// underJournal reports whether w is the stream systemd connected to the
// journal ($JOURNAL_STREAM names its device and inode).
func underJournal(w io.Writer) bool {
	js := os.Getenv("JOURNAL_STREAM")
	f, ok := w.(*os.File)
	if js == "" || !ok {
		return false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return js == fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}

// signalContext ends at the first SIGINT or SIGTERM, which starts a clean
// stop; from then on a second signal kills the process the default way.
func signalContext() (context.Context, context.CancelFunc) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop()
	}()
	return ctx, stop
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func parseDuration(name, s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, usageError{fmt.Errorf("--%s %q: give a duration like 30s, 10m or 1h", name, s)}
	}
	return d, nil
}

func flagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func processCommand(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("ephysd process", stderr)
	source := fs.String("source", "sim", "sim, or playback:DIR (an Open Ephys recording)")
	var modules multiFlag
	fs.Var(&modules, "module", "Python module to run (repeat for a chain of stages)")
	out := fs.String("out", "", "folder to record into (required)")
	channels := fs.Int("channels", 32, "sim: number of channels")
	rate := fs.Float64("rate", 30000, "sim: sample rate in Hz")
	durationFlag := fs.String("duration", "", "how much data to process (default: sim 10s, playback the whole recording)")
	realtime := fs.Bool("realtime", false, "pace the source to the wall clock instead of running as fast as possible")
	blockMS := fs.Float64("block-ms", 1, "block length in milliseconds")
	raw := fs.Bool("raw", false, "also record the stream before the Python stages")
	logLevel := fs.String("log-level", "warn", "debug, info, warn or error")
	cpuProfile := fs.String("cpuprofile", "", "write a Go CPU profile to this file (go tool pprof)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	if *out == "" {
		return usageError{errors.New("process: --out DIR is required")}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("process: unexpected argument %q", fs.Arg(0))}
	}
	duration, err := parseDuration("duration", *durationFlag)
	if err != nil {
		return err
	}
	var toml strings.Builder
	switch {
	case *source == "sim":
		if duration == 0 {
			duration = 10 * time.Second
		}
		if *rate != float64(int(*rate)) {
			return usageError{fmt.Errorf("process: --rate %v: the simulator takes a whole number of Hz", *rate)}
		}
		fmt.Fprintf(&toml, "[source]\ndriver = \"sim\"\n[source.sim]\nchannels = %d\nrate = %d\nrealtime = %v\n", *channels, int(*rate), *realtime)
	case strings.HasPrefix(*source, "playback:"):
		dir := strings.TrimPrefix(*source, "playback:")
		fmt.Fprintf(&toml, "[source]\ndriver = \"playback\"\n[source.playback]\npath = %q\nrealtime = %v\n", dir, *realtime)
	default:
		return usageError{fmt.Errorf("process: --source %q: use sim or playback:DIR", *source)}
	}
	fmt.Fprintf(&toml, "[pipeline]\nblock_ms = %v\n", floatTOML(*blockMS))
	fmt.Fprintf(&toml, "[recording]\nparent_directory = %q\nrecord_raw = %v\n", *out, *raw)
	fmt.Fprintf(&toml, "[log]\nlevel = %q\n", *logLevel)
	for _, m := range modules {
		fmt.Fprintf(&toml, "[[stage]]\nmodule = %q\n", m)
	}
	wd, _ := os.Getwd()
	cfg, err := ParseConfig(wd+"/(command line)", []byte(toml.String()))
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
	res, err := Process(ctx, cfg, log, duration, stderr)
	if res != nil {
		printSummary(stdout, res)
	}
	return err
}

// Process runs a chain from cfg, recording from the first block, for the
// given amount of data (0: until the source ends) or until ctx ends, and
// returns the stopped chain for its figures.
func Process(ctx context.Context, cfg *Config, log *zap.Logger, duration time.Duration, progress io.Writer) (*Chain, error) {
	if d, ok := cfg.Driver.(interface{ SetDuration(time.Duration) }); ok && duration > 0 {
		d.SetDuration(duration)
	}
	chain, err := NewChain(cfg, log)
	if err != nil {
		return nil, err
	}
	if _, err := chain.StartRecording(); err != nil {
		chain.closeAll()
		return nil, err
	}
	if err := chain.Start(); err != nil {
		chain.Stop()
		return nil, err
	}
	stopProgress := func() {}
	if progress != nil {
		stopProgress = startProgress(chain, progress)
	}
	var limit <-chan time.Time
	if duration > 0 {
		// The source stops itself at the duration when it can (sim); this is
		// a fallback for sources that cannot.
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		want := uint64(duration.Seconds() * chain.Info.SampleRate)
		done := make(chan time.Time)
		go func() {
			for {
				select {
				case <-tick.C:
					if chain.Runner.Stats().Samples >= want {
						close(done)
						return
					}
				case <-chain.Runner.Done():
					return
				}
			}
		}()
		limit = done
	}
	select {
	case <-ctx.Done():
	case <-limit:
	case <-chain.Runner.Done():
	}
	stopProgress()
	err = chain.Stop()
	return chain, err
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func floatTOML(f float64) string {
	s := fmt.Sprintf("%v", f)
	if !strings.ContainsAny(s, ".eEn") {
		s += ".0"
	}
	return s
}

// startProgress prints a status line every second while on a terminal, and
// nothing otherwise.
func startProgress(c *Chain, w io.Writer) (stop func()) {
	if !isTerminal(w) {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				fmt.Fprint(w, "\r\033[K")
				return
			case <-t.C:
				st := c.Runner.Stats()
				secs := float64(st.Samples) / c.Info.SampleRate
				speed := secs / c.Elapsed().Seconds()
				fmt.Fprintf(w, "\r\033[K%8.1f s of data  %6.1f× real time  %d blocks  %d events  %d overruns",
					secs, speed, st.Processed, st.Events, st.OverrunBlocks)
			}
		}
	}()
	return func() { close(done); <-finished }
}

// printSummary prints what a run did.
func printSummary(w io.Writer, c *Chain) {
	st := c.Runner.Stats()
	secs := float64(st.Samples) / c.Info.SampleRate
	el := c.Elapsed().Seconds()
	fmt.Fprintf(w, "source      %s: %d channels at %g Hz, blocks of %d samples\n", c.Info.ProcessorName, len(c.Info.Channels), c.Info.SampleRate, c.BlockSamples)
	fmt.Fprintf(w, "blocks      %d read, %d processed\n", st.Blocks, st.Processed)
	fmt.Fprintf(w, "samples     %d (%.3f s of data)\n", st.Samples, secs)
	fmt.Fprintf(w, "events      %d\n", st.Events)
	if c.Spikes != nil {
		printSpikes(w, c)
	}
	fmt.Fprintf(w, "overruns    %d blocks (%d samples dropped)\n", st.OverrunBlocks, st.OverrunSamples)
	if st.Gaps > 0 {
		fmt.Fprintf(w, "gaps        %d in the source (%d samples missing)\n", st.Gaps, st.GapSamples)
	}
	if c.Device != nil {
		if d := c.Device.State(); d.Disconnects > 0 {
			fmt.Fprintf(w, "device      disconnected %d times (last: %s)\n", d.Disconnects, d.LastError)
		}
	}
	for i, o := range c.Outputs {
		d := o.State()
		fmt.Fprintf(w, "output %d    connected=%v  disconnects %d  blocks of events dropped while away %d\n", i+1, d.Connected, d.Disconnects, o.Dropped())
	}
	for i, s := range c.Stages {
		h := c.PythonStageTime(i)
		status := s.Status()
		fmt.Fprintf(w, "python      %s [%s]: per block p50 %s  p99 %s  max %s", status.Name, status.State,
			fmtDur(h.Quantile(0.5)), fmtDur(h.Quantile(0.99)), fmtDur(h.Max()))
		if status.Errors > 0 {
			fmt.Fprintf(w, "  errors %d (last: %s)", status.Errors, status.LastError)
		}
		fmt.Fprintln(w)
	}
	if el > 0 {
		fmt.Fprintf(w, "speed       %.1f× real time (%.2f s wall clock)\n", secs/el, el)
	}
	if d := c.Session.Dir(); d != "" {
		fmt.Fprintf(w, "recording   %s\n", d)
	}
}

func fmtDur(d time.Duration) string {
	switch {
	case d < time.Microsecond:
		return fmt.Sprintf("%dns", d.Nanoseconds())
	case d < time.Millisecond:
		return fmt.Sprintf("%.1fµs", float64(d)/float64(time.Microsecond))
	default:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
}
