package daemon

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ephysd/ephysd/drivers/pulsepal"
	"github.com/ephysd/ephysd/drivers/stream"
)

// The fake devices of the latency benchmark run in a child process of
// their own (the hidden subcommand bench-devices): with its own Go runtime
// and scheduler, a device's timing thread never waits for one of ephysd's
// Ps to take a timestamp or to write its next frame, as a real headstage
// never waits for the host. The parent hands the child the two pty masters
// (fds 3 and 4) and a latDevicesSpec on stdin; the child prints "last"
// when the frame of the last crossing (and its tail) is written, and its
// latDevicesReport as one JSON line when both devices have ended (the
// ptys closed on the host's side).

func init() { registerHidden("bench-devices", benchDevicesMain) }

// latDevicesSpec is what the child needs to know.
type latDevicesSpec struct {
	Channels, Rate, Block int
	Planted               []int64
	MonoBase              int64 // the parent's latClock: CLOCK_MONOTONIC ns at its base
}

// latDevicesReport is what the child measured, in durations since the
// parent's clock base.
type latDevicesReport struct {
	Start    time.Duration
	Written  []time.Duration
	Began    []time.Duration
	Triggers []time.Duration
	Late     Quantiles
	Frames   int
	Realtime bool
	Err      string
}

func benchDevicesMain(args []string, stdout, stderr io.Writer) int {
	var spec latDevicesSpec
	dec := json.NewDecoder(os.Stdin)
	if err := dec.Decode(&spec); err != nil {
		fmt.Fprintf(stderr, "bench-devices: reading the spec on stdin: %v\n", err)
		return 2
	}
	// The parent closes stdin when it is done with the devices: normally
	// they have ended by then (EIO once the ptys' host sides are closed);
	// if a read still waits, the report is written anyway a moment later.
	closed := make(chan struct{})
	go func() {
		io.Copy(io.Discard, dec.Buffered())
		io.Copy(io.Discard, os.Stdin)
		close(closed)
	}()
	// Two timing threads, each mostly asleep in a syscall: with more Ps
	// than that, a thread back from its syscall always finds an idle P
	// at once instead of parking until one is handed over.
	runtime.GOMAXPROCS(max(4, runtime.GOMAXPROCS(0)))
	clk := newLatClock()
	offset := time.Duration(clk.monoBase - spec.MonoBase) // child time + offset = parent time
	in := &latPTY{master: os.NewFile(3, "headstage pty master"), fd: 3}
	out := &latPTY{master: os.NewFile(4, "pulse pal pty master"), fd: 4}
	dev, err := newLatHeadstage(in, clk, spec.Channels, spec.Rate, spec.Block, spec.Planted)
	if err != nil {
		fmt.Fprintf(stderr, "bench-devices: %v\n", err)
		return 2
	}
	ttl := newLatPulsePal(out, clk, len(spec.Planted)+64)
	dev.run()
	ttl.run()
	w := bufio.NewWriter(stdout)
	select {
	case <-dev.last:
		fmt.Fprintln(w, "last")
		w.Flush()
	case <-dev.done:
	}
	forced := ""
	for _, d := range []struct {
		name string
		done chan struct{}
	}{{"the headstage", dev.done}, {"the Pulse Pal", ttl.done}} {
		select {
		case <-d.done:
			continue
		case <-closed:
		}
		select {
		case <-d.done:
		case <-time.After(2 * time.Second):
			forced += d.name + " had not ended 2 s after the host closed the link; "
			dev.stop.Store(true)
		}
	}
	if forced != "" {
		fmt.Fprintf(stderr, "bench-devices: %sreporting what was measured\n", forced)
	}
	shift := func(ds []time.Duration) []time.Duration {
		for i := range ds {
			ds[i] += offset
		}
		return ds
	}
	rep := latDevicesReport{
		Start: dev.start + offset, Written: shift(dev.written), Began: shift(dev.began),
		Triggers: shift(ttl.triggers()), Late: latHistQuantiles(&dev.late), Frames: dev.frames,
		Realtime: latDeviceRealtime.Load(),
	}
	if dev.werr != nil {
		rep.Err = dev.werr.Error()
	}
	json.NewEncoder(w).Encode(rep)
	w.Flush()
	return 0
}

// latDevices is the parent's handle on the child.
type latDevices struct {
	cmd    *exec.Cmd
	last   chan struct{} // the child printed "last"
	done   chan struct{} // the child exited
	report latDevicesReport
	err    error // of the child, after done
	stderr bytes.Buffer
	stdin  io.WriteCloser // closed: the child reports and exits
}

// startLatDevices starts the fake devices' child on the masters of in and
// out.
func startLatDevices(in, out *latPTY, clk latClock, channels, rate, block int, planted []int64) (*latDevices, error) {
	spec, err := json.Marshal(latDevicesSpec{Channels: channels, Rate: rate, Block: block, Planted: planted, MonoBase: clk.monoBase})
	if err != nil {
		return nil, err
	}
	cmd, err := selfCommand("bench-devices")
	if err != nil {
		return nil, err
	}
	d := &latDevices{cmd: cmd, last: make(chan struct{}), done: make(chan struct{})}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	d.stdin = stdin
	cmd.Stderr = &d.stderr
	cmd.ExtraFiles = []*os.File{in.master, out.master}
	// No Pdeathsig: it fires when the thread that forked exits, and Go
	// ends the threads of goroutines that exit locked (the relay's). If
	// this process dies, the ptys' host sides close and the child's reads
	// fail with EIO, which ends it.
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the fake devices' process: %w", err)
	}
	if _, err := stdin.Write(spec); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("the fake devices' spec: %w", err)
	}
	go func() {
		defer close(d.done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		gotReport := false
		for sc.Scan() {
			line := sc.Bytes()
			if string(line) == "last" {
				close(d.last)
				continue
			}
			if err := json.Unmarshal(line, &d.report); err != nil {
				d.err = fmt.Errorf("the fake devices' report: %w", err)
			}
			gotReport = true
		}
		werr := cmd.Wait()
		switch {
		case d.err != nil:
		case werr != nil:
			d.err = fmt.Errorf("the fake devices' process: %v: %s", werr, strings.TrimSpace(d.stderr.String()))
		case !gotReport:
			d.err = errors.New("the fake devices' process ended without its report")
		case d.report.Err != "":
			d.err = errors.New(d.report.Err)
		}
	}()
	return d, nil
}

// wait waits for the child to end (the ptys' host sides closed), and
// kills it after limit.
func (d *latDevices) wait(limit time.Duration) error {
	d.stdin.Close()
	select {
	case <-d.done:
		return d.err
	case <-time.After(limit):
		d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("the fake devices did not end within %s of the chain's stop (does another process hold their ptys open?)", limit)
	}
}

// latRelay is the baseline host of the latency benchmark: the two pty hops
// and the stream protocol's decoding, without ephysd's pipeline or Python.
// On a locked thread (SCHED_FIFO at the closed_loop preset's priority when
// permitted, like ephysd's) it starts the fake headstage, reads its pty
// with blocking reads, and when a DATA frame holds the next planted
// crossing writes a Pulse Pal trigger to the output pty at once.
func latRelay(inPath, outPath string, block int, planted []int64, stop *atomic.Bool, ready chan<- error) {
	runtime.LockOSThread() // never unlocked: the thread may be realtime
	attr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: 50}
	unix.SchedSetAttr(0, &attr, 0)
	in, err := unix.Open(inPath, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		ready <- fmt.Errorf("baseline: opening %s: %w", inPath, err)
		return
	}
	defer unix.Close(in)
	out, err := unix.Open(outPath, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		ready <- fmt.Errorf("baseline: opening %s: %w", outPath, err)
		return
	}
	defer unix.Close(out)
	if err := latWriteAll(in, stream.AppendStart(stream.AppendHello(nil, stream.Version))); err != nil {
		ready <- fmt.Errorf("baseline: starting the headstage: %w", err)
		return
	}
	ready <- nil
	trigger := []byte{pulsepal.OpPrefix, pulsepal.OpTrigger, 1}
	dec := stream.NewDecoder(0)
	buf := make([]byte, 64<<10)
	next := 0
	for !stop.Load() {
		n, err := unix.Read(in, buf)
		if err == unix.EINTR {
			continue
		}
		if n <= 0 || err != nil {
			return
		}
		for off := 0; off < n; {
			off += dec.Feed(buf[off:n])
			for {
				f, ok := dec.Next()
				if !ok {
					break
				}
				if f.Type != stream.TypeData || len(f.Payload) < 8 {
					continue
				}
				first := int64(binary.LittleEndian.Uint64(f.Payload))
				end := first + int64(block)
				fire := false
				for next < len(planted) && planted[next] < end {
					fire = fire || planted[next] >= first
					next++
				}
				if fire {
					latWriteAll(out, trigger)
				}
			}
		}
	}
	latWriteAll(in, stream.AppendStop(nil))
}

// latTriggerWait is how long the harness waits, after the last crossing's
// frame, for the triggers still on their way.
const latTriggerWait = 300 * time.Millisecond

// benchLatencyBaseline measures (b) with latRelay as the host: the same
// fake devices' process, ptys, crossings and condition (the CPU hog; no
// recorder, there being no pipeline) as benchLatencyOne.
func benchLatencyBaseline(opts LatencyOptions, block int, cond string) (Quantiles, error) {
	clk := newLatClock()
	in, err := openLatPTY()
	if err != nil {
		return Quantiles{}, err
	}
	defer in.close()
	out, err := openLatPTY()
	if err != nil {
		in.releaseSlave()
		return Quantiles{}, err
	}
	defer out.close()
	planted := latPlantCrossings(opts.Events, opts.Rate, opts.Spacing, uint64(block)*1000+uint64(len(cond)))
	if cond == LatencyHog {
		hog, err := latStartHog()
		if err != nil {
			in.releaseSlave()
			out.releaseSlave()
			return Quantiles{}, err
		}
		defer func() { hog.Process.Kill(); hog.Wait() }()
	}
	devs, err := startLatDevices(in, out, clk, opts.Channels, opts.Rate, block, planted)
	if err != nil {
		in.releaseSlave()
		out.releaseSlave()
		return Quantiles{}, err
	}
	var stop atomic.Bool
	ready := make(chan error, 1)
	relayDone := make(chan struct{})
	go func() {
		defer close(relayDone)
		latRelay(in.Path, out.Path, block, planted, &stop, ready)
	}()
	stopAll := func() error {
		stop.Store(true)
		select {
		case <-relayDone:
		case <-time.After(5 * time.Second):
			// A relay blocked in read ends with EIO below.
		}
		in.releaseSlave()
		out.releaseSlave()
		return devs.wait(10 * time.Second)
	}
	if err := <-ready; err != nil {
		stopAll()
		return Quantiles{}, err
	}
	runFor := latWarmup + time.Duration(float64(planted[len(planted)-1])/float64(opts.Rate)*float64(time.Second)) + 30*time.Second
	select {
	case <-devs.last:
	case <-devs.done:
		return Quantiles{}, fmt.Errorf("baseline: the fake devices ended early: %v", devs.err)
	case <-time.After(runFor):
		stopAll()
		return Quantiles{}, errors.New("baseline: the fake headstage fell far behind real time")
	}
	time.Sleep(latTriggerWait)
	if err := stopAll(); err != nil {
		return Quantiles{}, fmt.Errorf("baseline: %w", err)
	}
	rep := devs.report
	_, sw, _, _, missed, spurious, how := latMatchTriggers(rep.Start, planted, rep.Began, rep.Written, rep.Triggers, float64(opts.Rate))
	if missed > 0 || spurious > 0 {
		return Quantiles{}, fmt.Errorf("baseline: %d triggers missed, %d spurious (matched %s)", missed, spurious, how)
	}
	return latQuantilesOf(sw), nil
}
