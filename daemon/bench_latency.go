package daemon

import (
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/creack/pty"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/ephysd/ephysd/drivers/pulsepal"
	"github.com/ephysd/ephysd/drivers/stream"
	"github.com/ephysd/ephysd/pipeline"
)

// LatencyOptions configure BenchLatency. The zero value runs the default
// suite.
type LatencyOptions struct {
	Events     int           // crossings per configuration; default 10000
	BlockSizes []int         // default 1, 4, 30
	Channels   int           // default 64
	Rate       int           // samples per second; default 30000
	Spacing    time.Duration // between planted crossings; default 5 ms (threshold_ttl's refractory is 2 ms, pulse 1 ms)
	PNG        string        // path of the histogram image to write ("" = none)
	Module     string        // the threshold module; default examples/threshold_ttl.py (relative to the working directory)
	Log        *zap.Logger   // the chain's logger; default none
	Progress   io.Writer     // one line per configuration while running (may be nil)
	// Conditions to run, among "idle" and "recording+cpu hog"; default
	// both.
	Conditions []string
	// NoBaseline skips the baseline run (the ptys without ephysd) of
	// each configuration.
	NoBaseline bool
	// Pipeline is extra TOML for the chain's [pipeline] table; default
	// `preset = "closed_loop"` (the source read on the Python thread,
	// realtime priority, locked memory). "-" measures the plain pipeline.
	Pipeline string
}

// The two conditions of BenchLatency.
const (
	LatencyIdle = "idle"
	LatencyHog  = "recording+cpu hog"
)

// Quantiles summarise a set of durations.
type Quantiles struct {
	P50, P90, P99, P999, Max time.Duration
	N                        int
}

// LatencyResult is one configuration of BenchLatency: a block size in a
// condition.
type LatencyResult struct {
	Block     int
	Condition string    // "idle" or "recording+cpu hog"
	Fill      Quantiles // (a) crossing sample due → last byte of its block written
	Software  Quantiles // (b) last byte of the block written → TTL byte read on the output pty
	Total     Quantiles // crossing sample due → TTL byte read
	Missed    int       // crossings with no trigger (should be 0)
	Spurious  int       // triggers with no crossing
	Overruns  uint64    // blocks ephysd dropped because the stages were behind

	// What ephysd and the harness measured of themselves, over every
	// block (bucket precision, ~3%):
	Inside     Quantiles // ephysd: block read from the source → its events handed to the outputs
	Python     Quantiles // ephysd: the threshold module's process() per block
	DeviceLate Quantiles // the fake headstage: frame written − frame due (its own timer lateness)
	Gaps       uint64    // gaps in sample numbers ephysd saw
	Matching   string    // "in order", or how triggers were matched when counts differed
	// (b) of each crossing split in three on the harness's clock: the
	// block's last byte written → ephysd has read the block (the input
	// pty, waking the reading thread, and any blocks still ahead of it);
	// → the Pulse Pal sink has written the trigger (the pipeline, Python,
	// the sink's write); → the harness has read it (the output pty).
	ToRead, ToWritten, ToHarness Quantiles
	// CPU used while streaming, in CPUs (1 = one core busy): by this
	// process (ephysd), by the fake devices' process, and by everything
	// else but the CPU hog (other processes; kernel workers, the ptys'
	// included).
	CPUSelf, CPUDevices, CPUOther float64
	// Baseline is (b) without ephysd, in the same condition: the two pty
	// hops and the stream decoding only, by latRelay (no pipeline, no
	// Python, no recorder); zero when not run.
	Baseline Quantiles
	// NonPositive counts software latencies ≤ 0: the trigger was read
	// before the fake headstage's write returned, i.e. its thread was
	// descheduled between the write and its timestamp (a harness artefact
	// of an overloaded machine).
	NonPositive int
	// DeviceRealtime tells whether the fake devices' threads ran
	// SCHED_FIFO.
	DeviceRealtime bool

	software, total []time.Duration // every event, for the histogram image
}

// The fake headstage's signal, in counts of 0.195 µV: uniform noise of
// ±25 counts (±4.9 µV) on every channel, and on channel 0 planted spikes
// of −513 counts (−100 µV) lasting latSpikeSamples samples, each one a
// downward crossing of threshold_ttl.py's −60 µV at its first sample.
const (
	latScaleUV      = 0.195
	latNoiseCounts  = 25
	latSpikeCounts  = -513
	latSpikeSamples = 10
	latWarmup       = 500 * time.Millisecond // before the first crossing
	latTail         = 50 * time.Millisecond  // after the last
)

// BenchLatency measures the closed-loop latency of ephysd: a fake headstage
// on a real pseudo-terminal streams Channels × Rate int16 samples in real
// time (ephysd stream protocol, one DATA frame per block) with threshold
// crossings planted on channel 0; ephysd runs the threshold module (Python
// in the loop) and triggers a fake Pulse Pal on a second pseudo-terminal,
// whose trigger messages (D5 4D mask) the harness timestamps as they
// arrive. Every block size is run idle, and recording with a CPU hog (a
// busy child process pinned to the last CPU).
//
// Sample s is due at START + s/Rate; a frame is written when its last
// sample is due, so Fill is the wait for the block to fill plus the fake
// headstage's own lateness (reported as DeviceLate).
//
// The fake devices run in a child process (bench-devices), as real
// devices run outside the host. Their two timing threads (the headstage's
// writer, the Pulse Pal's reader) are locked OS threads that sleep with
// clock_nanosleep and read with blocking reads, and run SCHED_FIFO when
// the process may (as root), so that the load they measure delays them as
// little as possible. Each configuration is then run once more with
// latRelay in place of ephysd (Baseline): what the ptys and the stream
// protocol cost on this machine without the pipeline and Python.
func BenchLatency(opts LatencyOptions) ([]LatencyResult, error) {
	if opts.Events <= 0 {
		opts.Events = 10000
	}
	if len(opts.BlockSizes) == 0 {
		opts.BlockSizes = []int{1, 4, 30}
	}
	if opts.Channels <= 0 {
		opts.Channels = 64
	}
	if opts.Rate <= 0 {
		opts.Rate = 30000
	}
	if opts.Spacing <= 0 {
		opts.Spacing = 5 * time.Millisecond
	}
	if opts.Module == "" {
		opts.Module = filepath.Join("examples", "threshold_ttl.py")
	}
	if len(opts.Conditions) == 0 {
		opts.Conditions = []string{LatencyIdle, LatencyHog}
	}
	for _, c := range opts.Conditions {
		if c != LatencyIdle && c != LatencyHog {
			return nil, fmt.Errorf("bench latency: condition %q: use %q or %q", c, LatencyIdle, LatencyHog)
		}
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	module, err := filepath.Abs(opts.Module)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(module); err != nil {
		return nil, fmt.Errorf("bench latency: the threshold module: %w (run from the repository root or give its path)", err)
	}
	opts.Module = module
	if opts.Channels > 0xFFFF || opts.Rate > 1_000_000 {
		return nil, fmt.Errorf("bench latency: %d channels at %d Hz is beyond the stream protocol", opts.Channels, opts.Rate)
	}
	var out []LatencyResult
	for _, block := range opts.BlockSizes {
		if block < 1 || block > 1024 {
			return out, fmt.Errorf("bench latency: block size %d: use 1–1024 samples", block)
		}
		for _, cond := range opts.Conditions {
			r, err := benchLatencyOne(opts, block, cond)
			if err != nil {
				return out, fmt.Errorf("bench latency, block %d, %s: %w", block, cond, err)
			}
			if !opts.NoBaseline {
				if r.Baseline, err = benchLatencyBaseline(opts, block, cond); err != nil {
					return out, fmt.Errorf("bench latency, block %d, %s: %w", block, cond, err)
				}
			}
			out = append(out, r)
			if opts.Progress != nil {
				fmt.Fprintf(opts.Progress, "block %2d, %-17s: software p50 %s p99 %s max %s; total p50 %s p99 %s; %d missed, %d spurious, %d overruns\n",
					r.Block, r.Condition, latDur(r.Software.P50), latDur(r.Software.P99), latDur(r.Software.Max),
					latDur(r.Total.P50), latDur(r.Total.P99), r.Missed, r.Spurious, r.Overruns)
			}
		}
	}
	if opts.PNG != "" {
		if err := writeLatencyPNG(opts.PNG, out); err != nil {
			return out, err
		}
	}
	return out, nil
}

// latClock maps Go's monotonic clock onto CLOCK_MONOTONIC, which
// clock_nanosleep needs: every time of the harness is a duration since
// base.
type latClock struct {
	base     time.Time
	monoBase int64 // CLOCK_MONOTONIC at base, ns
}

func newLatClock() latClock {
	c := latClock{base: time.Now()}
	best := time.Duration(math.MaxInt64)
	for i := 0; i < 20; i++ {
		before := time.Since(c.base)
		var ts unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		after := time.Since(c.base)
		if w := after - before; w < best {
			best = w
			c.monoBase = ts.Nano() - int64(before+w/2)
		}
	}
	return c
}

func (c latClock) now() time.Duration { return time.Since(c.base) }

// sleepUntil sleeps until t (since base) on the calling thread. Go's
// timers wake ~1 ms late at best on Linux; clock_nanosleep with a timer
// slack of 1 ns (set by the caller on its locked thread) wakes within a
// few µs.
func (c latClock) sleepUntil(t time.Duration) {
	ts := unix.NsecToTimespec(c.monoBase + int64(t))
	for unix.ClockNanosleep(unix.CLOCK_MONOTONIC, unix.TIMER_ABSTIME, &ts, nil) == unix.EINTR {
	}
}

// latPTY is a raw pseudo-terminal: the harness's device reads and writes
// the blocking master fd on its own threads; the driver opens Path. The
// harness keeps the slave open until close, so that the master never sees
// EIO before the driver opens the port.
type latPTY struct {
	master *os.File
	fd     int
	slave  *os.File
	once   sync.Once
	Path   string
}

func openLatPTY() (*latPTY, error) {
	m, s, err := pty.Open()
	if err != nil {
		return nil, fmt.Errorf("pseudo-terminal: %w", err)
	}
	if _, err := term.MakeRaw(int(s.Fd())); err != nil {
		m.Close()
		s.Close()
		return nil, fmt.Errorf("pseudo-terminal raw mode: %w", err)
	}
	// Fd leaves the master in blocking mode: reads block their thread
	// (woken straight by the kernel, not by Go's poller).
	return &latPTY{master: m, fd: int(m.Fd()), slave: s, Path: s.Name()}, nil
}

// releaseSlave closes the harness's slave: once the driver has closed
// its own, reads and writes of the master fail with EIO, which ends the
// device's threads (a write blocked on a full pty included).
func (p *latPTY) releaseSlave() { p.once.Do(func() { p.slave.Close() }) }

func (p *latPTY) close() { p.master.Close() }

// latHeadstage speaks the stream protocol on a pty master: it answers
// HELLO with its ANNOUNCE, and from START on writes one DATA frame of
// block samples when the frame's last sample is due (paced from START on
// CLOCK_MONOTONIC), with spikes at planted sample numbers.
type latHeadstage struct {
	p       *latPTY
	clk     latClock
	ann     stream.Announce
	enc     *stream.Encoder
	block   int
	rate    float64
	planted []int64 // sample numbers of the crossings, ascending

	started chan time.Duration // START received, at
	stop    atomic.Bool
	done    chan struct{} // the writer returned
	last    chan struct{} // the frame of the last crossing (+ tail) is written

	// Results, read after done.
	start   time.Duration
	written []time.Duration // per crossing: when the write of its block returned
	began   []time.Duration // per crossing: when that write began
	late    pipeline.Histogram
	frames  int
	werr    error
}

func newLatHeadstage(p *latPTY, clk latClock, channels, rate, block int, planted []int64) (*latHeadstage, error) {
	a := stream.Announce{
		Version: stream.Version, Format: stream.Int16, DigitalBytes: 2, Channels: channels, MaxSamples: block,
		RateMilliHz: uint32(rate * 1000), ScaleUV: latScaleUV, Name: "latency bench", Serial: "LAT0001", Firmware: "bench 1",
	}
	enc, err := stream.NewEncoder(a)
	if err != nil {
		return nil, err
	}
	return &latHeadstage{
		p: p, clk: clk, ann: a, enc: enc, block: block, rate: float64(rate), planted: planted,
		started: make(chan time.Duration, 1), done: make(chan struct{}), last: make(chan struct{}),
		written: make([]time.Duration, len(planted)), began: make([]time.Duration, len(planted)),
	}, nil
}

func (d *latHeadstage) run() {
	go d.commands()
	go d.write()
}

// commands reads the host's frames until the master fails (EIO once both
// slaves are closed).
func (d *latHeadstage) commands() {
	dec := stream.NewDecoder(0)
	buf := make([]byte, 4096)
	var out []byte
	for {
		n, err := unix.Read(d.p.fd, buf)
		if err == unix.EINTR {
			continue
		}
		if n <= 0 || err != nil {
			d.stop.Store(true)
			return
		}
		for off := 0; off < n; {
			off += dec.Feed(buf[off:n])
			for {
				f, ok := dec.Next()
				if !ok {
					break
				}
				switch f.Type {
				case stream.TypeHello:
					offered, _ := stream.ParseHello(f.Payload)
					if slices.Contains(offered, stream.Version) {
						out = d.enc.AppendAnnounce(out[:0])
					} else {
						out = stream.AppendError(out[:0], stream.ErrCodeVersion, []byte{stream.Version}, "latency bench speaks version 1")
					}
					latWriteAll(d.p.fd, out)
				case stream.TypeStart:
					select {
					case d.started <- d.clk.now():
					default:
					}
				case stream.TypeStop:
					d.stop.Store(true)
				}
			}
		}
	}
}

// latDevicePriority is the SCHED_FIFO priority of the fake devices'
// threads (the headstage's writer, the Pulse Pal's reader), when the
// process may set it: like hardware, they are then not delayed by the load
// they measure, and their timestamps are taken when things happen. It is
// above the [realtime] priority ephysd's presets use (50).
const latDevicePriority = 80

// latDeviceRealtime tells whether the fake devices' threads got it.
var latDeviceRealtime atomic.Bool

func latDeviceThread() {
	attr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: latDevicePriority}
	latDeviceRealtime.Store(unix.SchedSetAttr(0, &attr, 0) == nil)
}

// latWriteAll writes all of p to fd.
func latWriteAll(fd int, p []byte) error {
	for len(p) > 0 {
		n, err := unix.Write(fd, p)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// latNoiseTable is reused, cycling, as every channel's baseline noise.
var latNoiseTable = sync.OnceValue(func() []int32 {
	r := rand.New(rand.NewPCG(1, 2))
	t := make([]int32, 1<<16)
	for i := range t {
		t[i] = int32(r.IntN(2*latNoiseCounts+1) - latNoiseCounts)
	}
	return t
})

// write streams DATA frames from START until STOP (or the link fails),
// on a locked thread with a timer slack of 1 ns.
func (d *latHeadstage) write() {
	defer close(d.done)
	// Never unlocked: the thread, made precise and maybe realtime, ends
	// with the goroutine.
	runtime.LockOSThread()
	unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0)
	latDeviceThread()

	var t0 time.Duration
	select {
	case t0 = <-d.started:
	case <-time.After(10 * time.Second):
		d.werr = errors.New("the fake headstage got no START within 10 s")
		return
	}
	d.start = t0
	n, nch := d.block, d.ann.Channels
	samples := make([]int32, n*nch)
	digital := make([]uint64, n)
	buf := make([]byte, 0, d.enc.Layout().MaxFrame())
	noise := latNoiseTable()
	nextCrossing := 0 // index in planted of the next crossing to send
	var lastSample int64 = -1
	if len(d.planted) > 0 {
		lastSample = d.planted[len(d.planted)-1] + int64(float64(latTail)/float64(time.Second)*d.rate)
	}
	lastSent := false
	ni := 0
	for k := int64(0); !d.stop.Load(); k++ {
		first := k * int64(n)
		// The frame, made before its time.
		for i := 0; i < n; i++ {
			s := first + int64(i)
			for c := 0; c < nch; c++ {
				samples[i*nch+c] = noise[ni&(len(noise)-1)]
				ni++
			}
			for j := max(0, nextCrossing-1); j < len(d.planted) && d.planted[j] <= s; j++ {
				if s < d.planted[j]+latSpikeSamples {
					samples[i*nch] = latSpikeCounts
				}
			}
		}
		var err error
		if buf, err = d.enc.AppendData(buf[:0], uint64(first), samples, digital); err != nil {
			d.werr = err
			return
		}
		// Frame k is written when its last sample is due.
		due := t0 + time.Duration(float64(first+int64(n)-1)/d.rate*float64(time.Second))
		d.clk.sleepUntil(due)
		began := d.clk.now()
		if err := latWriteAll(d.p.fd, buf); err != nil {
			if !d.stop.Load() {
				d.werr = fmt.Errorf("the fake headstage's write: %w", err)
			}
			return
		}
		at := d.clk.now()
		d.late.Record(at - due)
		d.frames++
		end := first + int64(n)
		for nextCrossing < len(d.planted) && d.planted[nextCrossing] < end {
			d.written[nextCrossing], d.began[nextCrossing] = at, began
			nextCrossing++
		}
		if !lastSent && end > lastSample {
			lastSent = true
			close(d.last)
		}
	}
}

// latPulsePal is a Pulse Pal on a pty master: it answers the handshake and
// timestamps each soft-trigger message (D5 4D mask) the moment the read
// that completes it returns, on its own locked thread.
type latPulsePal struct {
	p    *latPTY
	clk  latClock
	mu   sync.Mutex
	at   []time.Duration
	junk int
	done chan struct{}
}

func newLatPulsePal(p *latPTY, clk latClock, capacity int) *latPulsePal {
	return &latPulsePal{p: p, clk: clk, at: make([]time.Duration, 0, capacity), done: make(chan struct{})}
}

func (f *latPulsePal) triggers() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.at)
}

func (f *latPulsePal) run() {
	go func() {
		defer close(f.done)
		runtime.LockOSThread() // never unlocked, as the headstage's writer
		latDeviceThread()
		var buf [256]byte
		var msg []byte // bytes of the message being read, from D5 on
		for {
			n, err := unix.Read(f.p.fd, buf[:])
			now := f.clk.now()
			if err == unix.EINTR {
				continue
			}
			if n <= 0 || err != nil {
				return
			}
			for _, b := range buf[:n] {
				if len(msg) == 0 && b != pulsepal.OpPrefix {
					f.junk++
					continue
				}
				msg = append(msg, b)
				if len(msg) < 2 {
					continue
				}
				need := 2
				switch msg[1] {
				case pulsepal.OpTrigger:
					need = 3
				case pulsepal.OpVoltage:
					need = 5
				case pulsepal.OpParameter:
					need = 4
					if len(msg) >= 3 {
						need = 4 + latParamBytes(msg[2])
					}
				}
				if len(msg) < need {
					continue
				}
				switch msg[1] {
				case pulsepal.OpHandshake:
					latWriteAll(f.p.fd, []byte{pulsepal.OpReply, 23, 0, 0, 0})
				case pulsepal.OpTrigger:
					f.mu.Lock()
					f.at = append(f.at, now)
					f.mu.Unlock()
				case pulsepal.OpVoltage, pulsepal.OpParameter:
					latWriteAll(f.p.fd, []byte{pulsepal.Ack})
				}
				msg = msg[:0]
			}
		}
	}()
}

// latParamBytes is the size of a Pulse Pal parameter's value.
func latParamBytes(code byte) int {
	switch code {
	case 2, 3, 17:
		return 2
	case 4, 5, 6, 7, 8, 9, 10, 11:
		return 4
	}
	return 1
}

// latPlantCrossings returns n sample numbers, the first after the warm-up,
// each at least spacing after the previous one plus a random 0–10% of it,
// so that crossings fall at every position within a block.
func latPlantCrossings(n, rate int, spacing time.Duration, seed uint64) []int64 {
	r := rand.New(rand.NewPCG(seed, 7))
	sp := int64(math.Ceil(spacing.Seconds() * float64(rate)))
	if sp < latSpikeSamples+2 {
		sp = latSpikeSamples + 2
	}
	s := int64(latWarmup.Seconds() * float64(rate))
	out := make([]int64, n)
	for i := range out {
		s += int64(r.IntN(int(sp/10) + 1))
		out[i] = s
		s += sp
	}
	return out
}

// latCPUTimes are clock ticks from /proc: all CPUs busy and idle, this
// process, the hog.
type latCPUTimes struct{ busy, idle, self, hog, dev uint64 }

func latReadCPU(hogPid, devPid int) latCPUTimes {
	var t latCPUTimes
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		f := strings.Fields(line)
		for i := 1; i < len(f) && i <= 8; i++ {
			v, _ := strconv.ParseUint(f[i], 10, 64)
			if i == 4 || i == 5 { // idle, iowait
				t.idle += v
			} else {
				t.busy += v
			}
		}
	}
	t.self = latProcTicks("/proc/self/stat")
	if hogPid > 0 {
		t.hog = latProcTicks(fmt.Sprintf("/proc/%d/stat", hogPid))
	}
	if devPid > 0 {
		t.dev = latProcTicks(fmt.Sprintf("/proc/%d/stat", devPid))
	}
	return t
}

// latProcTicks is a process's user + system time (all its threads).
func latProcTicks(path string) uint64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:])) // from field 3 (state) on
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	s, _ := strconv.ParseUint(f[12], 10, 64)
	return u + s
}

// since returns the CPUs used since t0 by this process, by the fake
// devices' process, and by everything else but the hog.
func (t latCPUTimes) since(t0 latCPUTimes) (self, dev, other float64) {
	all := float64((t.busy + t.idle) - (t0.busy + t0.idle))
	if all <= 0 {
		return 0, 0, 0
	}
	n := float64(runtime.NumCPU())
	self = float64(t.self-t0.self) / all * n
	dev = float64(t.dev-t0.dev) / all * n
	other = (float64(t.busy-t0.busy) - float64(t.self-t0.self) - float64(t.dev-t0.dev) - float64(t.hog-t0.hog)) / all * n
	return self, dev, max(0, other)
}

// latStartHog starts a busy child process pinned to the last CPU. It
// ends by itself, within ~0.1 s, if this process dies without killing it.
func latStartHog() (*exec.Cmd, error) {
	cmd := exec.Command("sh", "-c", "while kill -0 $PPID 2>/dev/null; do i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; done")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("the CPU hog: %w", err)
	}
	var set unix.CPUSet
	set.Set(runtime.NumCPU() - 1)
	if err := unix.SchedSetaffinity(cmd.Process.Pid, &set); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("pinning the CPU hog: %w", err)
	}
	return cmd, nil
}

func benchLatencyOne(opts LatencyOptions, block int, cond string) (res LatencyResult, err error) {
	res = LatencyResult{Block: block, Condition: cond}
	clk := newLatClock()
	dir, err := os.MkdirTemp("", "ephysd-latency")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)

	in, err := openLatPTY()
	if err != nil {
		return res, err
	}
	defer in.close()
	out, err := openLatPTY()
	if err != nil {
		in.releaseSlave()
		return res, err
	}
	defer out.close()
	planted := latPlantCrossings(opts.Events, opts.Rate, opts.Spacing, uint64(block)*1000+uint64(len(cond)))
	devs, err := startLatDevices(in, out, clk, opts.Channels, opts.Rate, block, planted)
	if err != nil {
		in.releaseSlave()
		out.releaseSlave()
		return res, err
	}
	// The devices end once the driver and the harness have both closed
	// the slaves.
	stopDevices := func() error {
		in.releaseSlave()
		out.releaseSlave()
		return devs.wait(10 * time.Second)
	}
	defer stopDevices()

	doc := fmt.Sprintf(`
[source]
driver = "stream"
[source.stream]
transport = "serial"
path = %q

[pipeline]
block_samples = %d
%s

[[stage]]
module = %q

[[output]]
driver = "pulsepal"
[output.pulsepal]
path = %q
[[output.pulsepal.map]]
line = 0
channel = 1
mode = "trigger"

[recording]
parent_directory = %q

[control]
http = ""
`, in.Path, block, pipelineExtra(opts.Pipeline), opts.Module, out.Path, filepath.Join(dir, "recordings"))
	cfg, err := ParseConfig(filepath.Join(dir, "latency.toml"), []byte(doc))
	if err != nil {
		return res, err
	}
	// The hog starts before the chain opens its ports (which are
	// close-on-exec; starting it first keeps that from mattering).
	var hog *exec.Cmd
	stopHog := func() {
		if hog != nil {
			hog.Process.Kill()
			hog.Wait()
			hog = nil
		}
	}
	defer stopHog()
	if cond == LatencyHog {
		if hog, err = latStartHog(); err != nil {
			return res, err
		}
	}
	probe := &latProbe{base: clk.base, recs: make([]latProbeRec, 0, len(planted)+64)}
	chain, err := NewChainWith(cfg, opts.Log, ChainOptions{ProbeSinks: []pipeline.EventSink{probe}})
	if err != nil {
		return res, err
	}
	probe.source = chain.Info.ProcessorID
	chainStopped := false
	defer func() {
		if !chainStopped {
			chain.Stop()
		}
	}()
	if len(chain.Stages) != 1 || chain.Stages[0].Status().State != "running" {
		return res, fmt.Errorf("the threshold module %s did not load (see the log)", opts.Module)
	}
	if cond == LatencyHog {
		if _, err := chain.StartRecording(); err != nil {
			return res, err
		}
	}
	if err := chain.Start(); err != nil {
		return res, err
	}
	hogPid := 0
	if hog != nil {
		hogPid = hog.Process.Pid
	}
	cpu0 := latReadCPU(hogPid, devs.cmd.Process.Pid)

	// Stream until the last crossing and its tail are out, then wait for
	// the triggers still on their way.
	runFor := latWarmup + time.Duration(float64(planted[len(planted)-1])/float64(opts.Rate)*float64(time.Second)) + 30*time.Second
	select {
	case <-devs.last:
	case <-devs.done:
		if devs.err != nil {
			return res, devs.err
		}
		return res, errors.New("the fake headstage stopped early (ephysd stopped the stream?)")
	case <-chain.Runner.Done():
		return res, fmt.Errorf("the chain ended: %v", chain.Runner.Wait())
	case <-time.After(runFor):
		return res, errors.New("the fake headstage fell far behind real time")
	}
	res.CPUSelf, res.CPUDevices, res.CPUOther = latReadCPU(hogPid, devs.cmd.Process.Pid).since(cpu0)
	time.Sleep(latTriggerWait) // the last triggers on their way
	st := chain.Runner.Stats()
	res.Overruns, res.Gaps = st.OverrunBlocks, st.Gaps
	res.Inside = latHistQuantiles(chain.Runner.Latency())
	res.Python = latHistQuantiles(chain.Runner.StageTime(0))
	chainStopped = true
	stopHog()
	if err := chain.Stop(); err != nil {
		return res, err
	}
	if err := stopDevices(); err != nil {
		return res, err
	}
	rep := devs.report
	res.DeviceLate = rep.Late

	fill, sw, total, matched, missed, spurious, how := latMatchTriggers(rep.Start, planted, rep.Began, rep.Written, rep.Triggers, float64(opts.Rate))
	res.Fill, res.Software, res.Total = latQuantilesOf(fill), latQuantilesOf(sw), latQuantilesOf(total)
	toRead, toWritten, toHarness := probe.split(matched, planted, rep.Written)
	res.ToRead, res.ToWritten, res.ToHarness = latQuantilesOf(toRead), latQuantilesOf(toWritten), latQuantilesOf(toHarness)
	res.software, res.total = sw, total
	for _, d := range sw {
		if d <= 0 {
			res.NonPositive++
		}
	}
	res.DeviceRealtime = rep.Realtime
	res.Missed, res.Spurious, res.Matching = missed, spurious, how
	return res, nil
}

// latMatchTriggers pairs triggers with crossings. With as many triggers as
// crossings, each arriving after the write of its crossing's block began,
// the k-th trigger is the k-th crossing's (the pipeline is in order).
// Otherwise each trigger goes to the latest crossing whose block's write
// began before it arrived, which is exact while latencies stay below the
// spacing; a crossing left without one is missed, a second trigger for
// one is spurious.
func latMatchTriggers(start time.Duration, planted []int64, began, written, arrived []time.Duration, rate float64) (fill, sw, total []time.Duration, matched []latMatch, missed, spurious int, how string) {
	due := func(i int) time.Duration {
		return start + time.Duration(float64(planted[i])/rate*float64(time.Second))
	}
	add := func(i int, a time.Duration) {
		fill = append(fill, written[i]-due(i))
		sw = append(sw, a-written[i])
		total = append(total, a-due(i))
		matched = append(matched, latMatch{i, a})
	}
	inOrder := len(arrived) == len(planted)
	for k := 0; inOrder && k < len(arrived); k++ {
		inOrder = arrived[k] >= began[k]
	}
	if inOrder {
		for k, a := range arrived {
			add(k, a)
		}
		return fill, sw, total, matched, 0, 0, "in order"
	}
	got := make([]bool, len(planted))
	for _, a := range arrived {
		// The latest crossing written before a.
		i := sort.Search(len(planted), func(i int) bool { return began[i] > a }) - 1
		if i < 0 || got[i] {
			spurious++
			continue
		}
		got[i] = true
		add(i, a)
	}
	for _, g := range got {
		if !g {
			missed++
		}
	}
	return fill, sw, total, matched, missed, spurious, fmt.Sprintf("by time (%d triggers for %d crossings)", len(arrived), len(planted))
}

// latMatch is a crossing (index into planted) and when its trigger arrived.
type latMatch struct {
	crossing int
	arrived  time.Duration
}

// latProbe is an event sink after the Pulse Pal's: for each rising edge
// of line 0 it notes, on the harness's clock, when ephysd had read the
// block holding it and when the outputs had been handed it (the Pulse
// Pal's write returned).
type latProbe struct {
	base   time.Time
	source int // the source's processor id: its own TTL inputs are not triggers
	mu     sync.Mutex
	recs   []latProbeRec // preallocated: the probe allocates nothing
}

type latProbeRec struct {
	sample          int64
	read, delivered time.Duration
}

func (p *latProbe) HandleEvents(b *pipeline.Block) error {
	for _, e := range b.Events {
		if e.Kind == pipeline.EventTTL && e.Line == 0 && e.State && e.Processor != p.source {
			now := time.Since(p.base)
			p.mu.Lock()
			if len(p.recs) < cap(p.recs) {
				p.recs = append(p.recs, latProbeRec{sample: e.SampleNumber, read: b.ReadAt.Sub(p.base), delivered: now})
			}
			p.mu.Unlock()
		}
	}
	return nil
}

// split divides the software latency of each matched crossing at the
// probe's two timestamps; crossings the probe did not see are left out.
func (p *latProbe) split(matched []latMatch, planted []int64, written []time.Duration) (toRead, toWritten, toHarness []time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	at := make(map[int64]latProbeRec, len(p.recs))
	for _, r := range p.recs {
		if _, dup := at[r.sample]; !dup {
			at[r.sample] = r
		}
	}
	for _, m := range matched {
		r, ok := at[planted[m.crossing]]
		if !ok {
			continue
		}
		toRead = append(toRead, r.read-written[m.crossing])
		toWritten = append(toWritten, r.delivered-r.read)
		toHarness = append(toHarness, m.arrived-r.delivered)
	}
	return toRead, toWritten, toHarness
}

// latQuantilesOf returns exact quantiles (nearest rank) of d.
func latQuantilesOf(d []time.Duration) Quantiles {
	if len(d) == 0 {
		return Quantiles{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	at := func(q float64) time.Duration {
		i := int(math.Ceil(q*float64(len(s)))) - 1
		return s[max(0, min(len(s)-1, i))]
	}
	return Quantiles{P50: at(0.5), P90: at(0.9), P99: at(0.99), P999: at(0.999), Max: s[len(s)-1], N: len(s)}
}

func latHistQuantiles(h *pipeline.Histogram) Quantiles {
	return Quantiles{P50: h.Quantile(0.5), P90: h.Quantile(0.9), P99: h.Quantile(0.99), P999: h.Quantile(0.999), Max: h.Max(), N: int(h.Count())}
}

// Latency goals: crossing → TTL, 64 ch × 30 kHz, blocks of 1–4 samples,
// Python in the loop, while recording.
var latencyGoals = []struct {
	name string
	q    func(Quantiles) time.Duration
	max  time.Duration
}{
	{"p50", func(q Quantiles) time.Duration { return q.P50 }, 100 * time.Microsecond},
	{"p99", func(q Quantiles) time.Duration { return q.P99 }, 250 * time.Microsecond},
	{"p99.9", func(q Quantiles) time.Duration { return q.P999 }, time.Millisecond},
}

// PrintLatency prints the results as a table, ephysd's own breakdown, and
// whether the goals are met.
func PrintLatency(w io.Writer, rs []LatencyResult) {
	fmt.Fprintln(w, "Closed-loop latency: crossing on channel 0 → Pulse Pal trigger byte, through two real pseudo-terminals and examples/threshold_ttl.py")
	fmt.Fprintln(w, "(a) fill: crossing sample due → last byte of its block written by the fake headstage")
	fmt.Fprintln(w, "(b) software: that byte written → trigger message read on the output pty;  total = (a) + (b)")
	fmt.Fprintln(w)
	fmt.Fprintf(w, "| block | condition | latency | p50 | p90 | p99 | p99.9 | max | events | missed | spurious | overruns |\n")
	fmt.Fprintf(w, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		for i, row := range []struct {
			name string
			q    Quantiles
		}{{"(a) fill", r.Fill}, {"(b) software", r.Software}, {"total", r.Total}} {
			tail := "| | | |"
			if i == 0 {
				tail = fmt.Sprintf("| %d | %d | %d |", r.Missed, r.Spurious, r.Overruns)
			}
			fmt.Fprintf(w, "| %d | %s | %s | %s | %s | %s | %s | %s | %d %s\n", r.Block, r.Condition, row.name,
				latDur(row.q.P50), latDur(row.q.P90), latDur(row.q.P99), latDur(row.q.P999), latDur(row.q.Max), row.q.N, tail)
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Breakdown over every block (ephysd's own histograms, ~3% buckets; the fake headstage's timer), the baseline, and (b) of each event split where ephysd read its block and where its trigger was written (the harness's clock; \"blocks\" counts events there):")
	fmt.Fprintf(w, "| block | condition | figure | p50 | p99 | p99.9 | max | blocks |\n|---:|---|---|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		for _, row := range []struct {
			name string
			q    Quantiles
		}{
			{"ephysd: block read → events at the outputs", r.Inside},
			{"ephysd: threshold_ttl.py process()", r.Python},
			{"fake headstage: write − due", r.DeviceLate},
			{"baseline (b) without ephysd: 2 pty hops + stream decoding", r.Baseline},
			{"(b) split, per event: last byte written → ephysd has read the block", r.ToRead},
			{"(b) split, per event: → the Pulse Pal sink has written the trigger", r.ToWritten},
			{"(b) split, per event: → the harness has read the trigger", r.ToHarness},
		} {
			if row.q.N == 0 {
				continue
			}
			fmt.Fprintf(w, "| %d | %s | %s | %s | %s | %s | %s | %d |\n", r.Block, r.Condition, row.name,
				latDur(row.q.P50), latDur(row.q.P99), latDur(row.q.P999), latDur(row.q.Max), row.q.N)
		}
	}
	for _, r := range rs {
		rt := "SCHED_FIFO"
		if !r.DeviceRealtime {
			rt = "normal scheduling"
		}
		fmt.Fprintf(w, "block %d, %s: CPU while streaming: ephysd %.2f CPUs, the fake devices' process %.2f CPUs, everything else but the hog %.2f CPUs; fake devices' threads %s\n",
			r.Block, r.Condition, r.CPUSelf, r.CPUDevices, r.CPUOther, rt)
		if r.NonPositive > 0 {
			fmt.Fprintf(w, "block %d, %s: %d software latencies ≤ 0 (the fake headstage's thread was descheduled between its write and its timestamp; left out of the image)\n", r.Block, r.Condition, r.NonPositive)
		}
		if r.Matching != "" && r.Matching != "in order" {
			fmt.Fprintf(w, "block %d, %s: triggers matched %s\n", r.Block, r.Condition, r.Matching)
		}
		if r.Gaps > 0 {
			fmt.Fprintf(w, "block %d, %s: %d gaps in sample numbers\n", r.Block, r.Condition, r.Gaps)
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Goals (total, crossing → TTL; 64 ch, 30 kHz, blocks of 1–4 samples, Python in the loop, while recording): p50 ≤ 100 µs, p99 ≤ 250 µs, p99.9 ≤ 1 ms")
	any := false
	for _, r := range rs {
		if r.Block > 4 {
			continue
		}
		any = true
		fmt.Fprintf(w, "  block %d, %-17s:", r.Block, r.Condition)
		for _, g := range latencyGoals {
			v := g.q(r.Total)
			verdict := "met"
			if v > g.max || r.Missed > 0 {
				verdict = "NOT met"
			}
			fmt.Fprintf(w, "  %s %s ≤ %s %s;", g.name, latDur(v), latDur(g.max), verdict)
		}
		if r.Missed > 0 {
			fmt.Fprintf(w, "  %d triggers missed", r.Missed)
		}
		fmt.Fprintln(w)
	}
	if !any {
		fmt.Fprintln(w, "  (no block of 1–4 samples was run)")
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Histogram image: one row per block size (recording+cpu hog when run, else idle); left (b) software, right total.")
	fmt.Fprintln(w, "x: latency, log scale, labelled in US/MS; y: events per bin (25 bins per decade), log scale.")
	fmt.Fprintln(w, "Vertical lines: green p50, orange p99, red p99.9; grey: the goals 100 µs, 250 µs, 1 ms.")
}

// latDur formats a latency: "83.2µs", "1.25ms".
func latDur(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return fmt.Sprintf("%.1fµs", float64(d)/float64(time.Microsecond))
	default:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
}

// The histogram image, drawn with the standard library only.

var (
	latColBG    = color.RGBA{255, 255, 255, 255}
	latColAxis  = color.RGBA{40, 40, 40, 255}
	latColGrid  = color.RGBA{225, 225, 225, 255}
	latColBar   = color.RGBA{70, 110, 170, 255}
	latColP50   = color.RGBA{30, 150, 60, 255}
	latColP99   = color.RGBA{230, 130, 0, 255}
	latColP999  = color.RGBA{210, 30, 30, 255}
	latColGoal  = color.RGBA{150, 150, 150, 255}
	latColTitle = color.RGBA{0, 0, 0, 255}
)

// latFont3x5 is a 3×5 pixel font: one string per row, '#' set.
var latFont3x5 = map[rune][5]string{
	'0': {"###", "#.#", "#.#", "#.#", "###"}, '1': {".#.", "##.", ".#.", ".#.", "###"},
	'2': {"###", "..#", "###", "#..", "###"}, '3': {"###", "..#", ".##", "..#", "###"},
	'4': {"#.#", "#.#", "###", "..#", "..#"}, '5': {"###", "#..", "###", "..#", "###"},
	'6': {"###", "#..", "###", "#.#", "###"}, '7': {"###", "..#", "..#", ".#.", ".#."},
	'8': {"###", "#.#", "###", "#.#", "###"}, '9': {"###", "#.#", "###", "..#", "###"},
	'A': {".#.", "#.#", "###", "#.#", "#.#"}, 'B': {"##.", "#.#", "##.", "#.#", "##."},
	'C': {".##", "#..", "#..", "#..", ".##"}, 'D': {"##.", "#.#", "#.#", "#.#", "##."},
	'E': {"###", "#..", "##.", "#..", "###"}, 'F': {"###", "#..", "##.", "#..", "#.."},
	'G': {".##", "#..", "#.#", "#.#", ".##"}, 'H': {"#.#", "#.#", "###", "#.#", "#.#"},
	'I': {"###", ".#.", ".#.", ".#.", "###"}, 'J': {"..#", "..#", "..#", "#.#", ".#."},
	'K': {"#.#", "#.#", "##.", "#.#", "#.#"}, 'L': {"#..", "#..", "#..", "#..", "###"},
	'M': {"#.#", "###", "###", "#.#", "#.#"}, 'N': {"##.", "#.#", "#.#", "#.#", "#.#"},
	'O': {".#.", "#.#", "#.#", "#.#", ".#."}, 'P': {"##.", "#.#", "##.", "#..", "#.."},
	'Q': {".#.", "#.#", "#.#", "##.", ".##"}, 'R': {"##.", "#.#", "##.", "#.#", "#.#"},
	'S': {".##", "#..", ".#.", "..#", "##."}, 'T': {"###", ".#.", ".#.", ".#.", ".#."},
	'U': {"#.#", "#.#", "#.#", "#.#", "###"}, 'V': {"#.#", "#.#", "#.#", "#.#", ".#."},
	'W': {"#.#", "#.#", "###", "###", "#.#"}, 'X': {"#.#", "#.#", ".#.", "#.#", "#.#"},
	'Y': {"#.#", "#.#", ".#.", ".#.", ".#."}, 'Z': {"###", "..#", ".#.", "#..", "###"},
	' ': {"...", "...", "...", "...", "..."}, '.': {"...", "...", "...", "...", ".#."},
	',': {"...", "...", "...", ".#.", "#.."}, '-': {"...", "...", "###", "...", "..."},
	'+': {"...", ".#.", "###", ".#.", "..."}, '=': {"...", "###", "...", "###", "..."},
	'/': {"..#", "..#", ".#.", "#..", "#.."}, ':': {"...", ".#.", "...", ".#.", "..."},
	'(': {".#.", "#..", "#..", "#..", ".#."}, ')': {".#.", "..#", "..#", "..#", ".#."},
	'<': {"..#", ".#.", "#..", ".#.", "..#"}, '>': {"#..", ".#.", "..#", ".#.", "#.."},
	'%': {"#.#", "..#", ".#.", "#..", "#.#"},
}

const latFontScale = 2 // screen pixels per font pixel

// latTextWidth is the width of s in pixels.
func latTextWidth(s string) int { return len([]rune(s)) * 4 * latFontScale }

// latDrawText draws s (upper-cased) with its top-left corner at x, y.
func latDrawText(img *image.RGBA, x, y int, s string, c color.Color) {
	for _, r := range strings.ToUpper(s) {
		g, ok := latFont3x5[r]
		if !ok {
			g = latFont3x5['-']
		}
		for row := 0; row < 5; row++ {
			for col := 0; col < 3; col++ {
				if g[row][col] == '#' {
					draw.Draw(img, image.Rect(x+col*latFontScale, y+row*latFontScale, x+(col+1)*latFontScale, y+(row+1)*latFontScale), image.NewUniform(c), image.Point{}, draw.Src)
				}
			}
		}
		x += 4 * latFontScale
	}
}

func latFillRect(img *image.RGBA, r image.Rectangle, c color.Color) {
	draw.Draw(img, r, image.NewUniform(c), image.Point{}, draw.Src)
}

// latVLine draws a vertical line; dashed leaves gaps.
func latVLine(img *image.RGBA, x, y0, y1 int, c color.Color, dashed bool) {
	for y := y0; y < y1; y++ {
		if !dashed || (y/4)%2 == 0 {
			img.Set(x, y, c)
		}
	}
}

// latTickLabel names a decade tick: "10US", "1MS".
func latTickLabel(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%dS", d/time.Second)
	case d >= time.Millisecond:
		return fmt.Sprintf("%dMS", d/time.Millisecond)
	case d >= time.Microsecond:
		return fmt.Sprintf("%dUS", d/time.Microsecond)
	}
	return fmt.Sprintf("%dNS", d)
}

// writeLatencyPNG draws, per block size, the histograms of the software
// and total latencies of the "recording+cpu hog" condition (idle when it
// was not run), on a shared log-scaled x axis.
func writeLatencyPNG(path string, rs []LatencyResult) error {
	type panel struct {
		title string
		data  []time.Duration
		q     Quantiles
	}
	var rows [][2]panel
	var lo, hi time.Duration = math.MaxInt64, 0
	for _, cond := range []string{LatencyHog, LatencyIdle} {
		for _, r := range rs {
			if r.Condition != cond || r.software == nil {
				continue
			}
			rows = append(rows, [2]panel{
				{fmt.Sprintf("BLOCK %d, %s: (B) SOFTWARE, N=%d", r.Block, cond, len(r.software)), r.software, r.Software},
				{fmt.Sprintf("BLOCK %d, %s: TOTAL", r.Block, cond), r.total, r.Total},
			})
			for _, d := range append(slices.Clone(r.software), r.total...) {
				if d > 0 {
					lo, hi = min(lo, d), max(hi, d)
				}
			}
		}
		if len(rows) > 0 {
			break
		}
	}
	if len(rows) == 0 {
		return fmt.Errorf("latency histogram %s: no latencies to draw", path)
	}
	// Whole decades around the data.
	decLo := math.Floor(math.Log10(float64(lo)))
	decHi := math.Ceil(math.Log10(float64(hi)))
	if decHi <= decLo {
		decHi = decLo + 1
	}
	const (
		perDecade = 25
		plotW     = 480
		plotH     = 150
		left      = 56 // y labels
		gapX      = 40
		top       = 70 // title and legend
		titleH    = 18
		rowH      = titleH + plotH + 34
		width     = left + 2*plotW + gapX + left + 40
	)
	height := top + len(rows)*rowH + 10
	img := image.NewRGBA(image.Rect(0, 0, width, height))
	latFillRect(img, img.Bounds(), latColBG)
	latDrawText(img, 10, 10, "EPHYSD CLOSED-LOOP LATENCY: THRESHOLD CROSSING -> PULSE PAL TRIGGER (64 CH, 30 KHZ, PYTHON IN THE LOOP)", latColTitle)
	lx := 10
	for _, l := range []struct {
		s string
		c color.Color
	}{{"EVENTS PER BIN (LOG Y)", latColBar}, {"P50", latColP50}, {"P99", latColP99}, {"P99.9", latColP999}, {"GOALS 100US 250US 1MS", latColGoal}} {
		latFillRect(img, image.Rect(lx, 34, lx+14, 44), l.c)
		latDrawText(img, lx+20, 34, l.s, latColAxis)
		lx += 20 + latTextWidth(l.s) + 24
	}
	nbins := int(math.Round((decHi - decLo) * perDecade))
	xOf := func(d time.Duration) float64 { // 0..1 across the axis
		return (math.Log10(float64(d)) - decLo) / (decHi - decLo)
	}
	for ri, row := range rows {
		y0 := top + ri*rowH
		for pi, p := range row {
			x0 := left + pi*(plotW+gapX+left)
			latDrawText(img, x0, y0, p.title, latColTitle)
			py := y0 + titleH
			counts := make([]int, nbins)
			for _, d := range p.data {
				if d <= 0 {
					continue // see PrintLatency
				}
				b := int(xOf(d) * float64(nbins))
				counts[max(0, min(nbins-1, b))]++
			}
			maxC := slices.Max(counts)
			logMax := math.Log10(float64(max(maxC, 1)) + 1)
			yOf := func(c float64) int { // count → pixel row
				return py + plotH - int(math.Round(math.Log10(c+1)/logMax*float64(plotH)))
			}
			// Grid and y ticks: 1, 10, 100, …
			for c := 1; c <= maxC; c *= 10 {
				y := yOf(float64(c))
				for x := x0; x < x0+plotW; x++ {
					img.Set(x, y, latColGrid)
				}
				lbl := fmt.Sprint(c)
				latDrawText(img, x0-6-latTextWidth(lbl), y-5, lbl, latColAxis)
			}
			// Bars.
			for b, c := range counts {
				if c == 0 {
					continue
				}
				bx0 := x0 + b*plotW/nbins
				bx1 := x0 + (b+1)*plotW/nbins - 1
				latFillRect(img, image.Rect(bx0, yOf(float64(c)), max(bx1, bx0+1), py+plotH), latColBar)
			}
			// Axes.
			latFillRect(img, image.Rect(x0, py+plotH, x0+plotW, py+plotH+1), latColAxis)
			latFillRect(img, image.Rect(x0-1, py, x0, py+plotH+1), latColAxis)
			// x ticks: 1-2-5 per decade, labels at decades.
			for dec := decLo; dec <= decHi; dec++ {
				for _, m := range []float64{1, 2, 5} {
					d := time.Duration(m * math.Pow(10, dec))
					f := xOf(d)
					if f < 0 || f > 1.0001 {
						continue
					}
					x := x0 + int(f*float64(plotW-1))
					h := 3
					if m == 1 {
						h = 6
						lbl := latTickLabel(d)
						latDrawText(img, x-latTextWidth(lbl)/2, py+plotH+9, lbl, latColAxis)
					}
					latVLine(img, x, py+plotH+1, py+plotH+1+h, latColAxis, false)
				}
			}
			// Goals and quantiles.
			for _, g := range latencyGoals {
				if f := xOf(g.max); f >= 0 && f <= 1 {
					latVLine(img, x0+int(f*float64(plotW-1)), py, py+plotH, latColGoal, true)
				}
			}
			for _, m := range []struct {
				d time.Duration
				c color.Color
			}{{p.q.P50, latColP50}, {p.q.P99, latColP99}, {p.q.P999, latColP999}} {
				if f := xOf(max(m.d, 1)); f >= 0 && f <= 1 {
					x := x0 + int(f*float64(plotW-1))
					latVLine(img, x, py, py+plotH, m.c, false)
					latVLine(img, x+1, py, py+plotH, m.c, false)
				}
			}
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("latency histogram: %w", err)
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return fmt.Errorf("latency histogram %s: %w", path, err)
	}
	return f.Close()
}

// pipelineExtra is the [pipeline] TOML a latency run adds.
func pipelineExtra(p string) string {
	switch p {
	case "":
		return `preset = "closed_loop"`
	case "-":
		return ""
	}
	return p
}
