package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// fakeSystemd is the receiving end of NOTIFY_SOCKET: a unixgram socket whose
// datagrams (one per sd_notify message) arrive on msgs.
type fakeSystemd struct {
	path  string
	msgs  chan string
	syncs int
}

// newFakeSystemd listens on a socket in a temporary folder and points
// NOTIFY_SOCKET (and, if watchdog > 0, WATCHDOG_USEC/WATCHDOG_PID) at it.
func newFakeSystemd(t *testing.T, watchdog time.Duration) *fakeSystemd {
	t.Helper()
	dir := t.TempDir()
	if len(dir) > 90 { // sun_path holds 108 bytes
		var err error
		if dir, err = os.MkdirTemp("/tmp", "sd"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeSystemd{path: path, msgs: make(chan string, 1024)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			f.msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { conn.Close(); <-done })
	t.Setenv("NOTIFY_SOCKET", path)
	if watchdog > 0 {
		t.Setenv("WATCHDOG_USEC", strconv.FormatInt(watchdog.Microseconds(), 10))
		t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	} else {
		t.Setenv("WATCHDOG_USEC", "")
		t.Setenv("WATCHDOG_PID", "")
	}
	return f
}

// next returns the next message, failing the test after a generous wait.
func (f *fakeSystemd) next(t *testing.T) string {
	t.Helper()
	select {
	case m := <-f.msgs:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message on NOTIFY_SOCKET within 10 s")
		return ""
	}
}

// sync returns every message sent before it was called: it sends a marker
// of its own and collects what arrives ahead of it (a unix datagram socket
// keeps the order in which datagrams were sent, whoever sent them).
func (f *fakeSystemd) sync(t *testing.T) []string {
	t.Helper()
	f.syncs++
	marker := "TEST-SYNC=" + strconv.Itoa(f.syncs)
	c, err := net.Dial("unixgram", f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(marker)); err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		m := f.next(t)
		if m == marker {
			return got
		}
		got = append(got, m)
	}
}

func TestNotifierReadyStatusStopping(t *testing.T) {
	f := newFakeSystemd(t, 0)
	n := NewNotifier(zap.NewNop())
	n.Status("starting")
	n.Ready()
	n.Status("idle")
	n.Status("idle")                  // unchanged: not sent again
	n.Status("acquiring:\nsim 32 ch") // one line
	n.Status("acquiring: sim 32 ch")  // the same once flattened
	n.Stopping()
	want := []string{"STATUS=starting", "READY=1", "STATUS=idle", "STATUS=acquiring: sim 32 ch", "STOPPING=1"}
	for i, w := range want {
		if got := f.next(t); got != w {
			t.Fatalf("message %d: got %q, want %q (all wanted: %q)", i+1, got, w, want)
		}
	}
	if extra := f.sync(t); len(extra) > 0 {
		t.Fatalf("unexpected extra messages %q", extra)
	}
	if n.WatchdogInterval() != 0 {
		t.Fatalf("watchdog interval %v without WATCHDOG_USEC", n.WatchdogInterval())
	}
	// Without a watchdog RunWatchdog returns at once.
	returned := make(chan struct{})
	go func() { n.RunWatchdog(context.Background(), func() error { return nil }); close(returned) }()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("RunWatchdog kept running without WATCHDOG_USEC")
	}
}

func TestNotifierOutsideSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "1000000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	for _, n := range []*Notifier{NewNotifier(nil), nil} {
		n.Ready()
		n.Status("idle")
		n.Stopping()
		n.RunWatchdog(context.Background(), func() error { return nil }) // returns at once
		if n.WatchdogInterval() != 0 {
			t.Fatalf("watchdog interval %v outside systemd", n.WatchdogInterval())
		}
	}
}

func TestNotifierWatchdogForAnotherPID(t *testing.T) {
	newFakeSystemd(t, time.Second)
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()+1))
	if d := NewNotifier(nil).WatchdogInterval(); d != 0 {
		t.Fatalf("watchdog for another pid taken as ours: %v", d)
	}
}

func TestNotifierWatchdog(t *testing.T) {
	const watchdog = 600 * time.Millisecond // pings every 200 ms
	f := newFakeSystemd(t, watchdog)
	core, logs := observer.New(zap.InfoLevel)
	n := NewNotifier(zap.New(core))
	if n.WatchdogInterval() != watchdog {
		t.Fatalf("watchdog interval %v, want %v", n.WatchdogInterval(), watchdog)
	}

	// healthy reports each call's verdict on checks, so that the test
	// follows the watchdog loop by its calls rather than by the clock.
	var stalled atomic.Bool
	var calls atomic.Int64
	checks := make(chan error, 1024)
	healthy := func() error {
		var err error
		if stalled.Load() { // a reason whose text changes on every call
			err = fmt.Errorf("no block from the pipeline for %d checks", calls.Add(1))
		}
		checks <- err
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{})
	start := time.Now() // before the loop's ticker exists
	go func() { n.RunWatchdog(ctx, healthy); close(finished) }()
	defer func() { cancel(); <-finished }()

	// Healthy: pings come at a third of the interval. A ticker never fires
	// early, so 6 pings (the first is immediate) take at least 5 × 200 ms;
	// the upper bound only catches pings too slow for systemd on average,
	// with room for a loaded machine.
	const pings = 6
	for i := 0; i < pings; i++ {
		if m := f.next(t); m != "WATCHDOG=1" {
			t.Fatalf("got %q, want WATCHDOG=1", m)
		}
	}
	el := time.Since(start)
	if min := (pings - 1) * watchdog / 3 * 9 / 10; el < min {
		t.Fatalf("%d pings in %v: faster than every %v", pings, el, watchdog/3)
	}
	if max := (pings - 1) * watchdog; el > max {
		t.Fatalf("%d pings in %v: on average slower than the %v watchdog", pings, el, watchdog)
	}
	t.Logf("%d pings in %v (every %v expected)", pings, el, watchdog/3)

	// Stalled: once healthy has said so, no ping at all. A ping whose check
	// passed before the stall was sent before the next check ran, so what
	// sync collects after the first failing check is all that may be late.
	stalled.Store(true)
	for err := range checks {
		if err != nil {
			break
		}
	}
	f.sync(t)
	for failing := 0; failing < 4; { // four more watchdog periods/3
		select {
		case err := <-checks:
			if err == nil {
				t.Fatal("healthy reported nil while stalled")
			}
			failing++
		case <-time.After(10 * time.Second):
			t.Fatal("the watchdog loop stopped checking health")
		}
	}
	if got := f.sync(t); len(got) > 0 {
		t.Fatalf("sent %q while the pipeline was stalled: systemd would not restart us", got)
	}
	// The reason is logged, but not on every check (once, or twice if this
	// machine took over 5 s for the five checks).
	stalls := logs.FilterMessageSnippet("unhealthy").All()
	if len(stalls) < 1 || len(stalls) > 2 {
		t.Fatalf("%d unhealthy log lines over 5 failing checks, want 1 (rate-limited)", len(stalls))
	}
	if r := stalls[0].ContextMap()["reason"]; !strings.Contains(r.(string), "no block") {
		t.Fatalf("logged reason %q", r)
	}

	// Healthy again: pings resume.
	stalled.Store(false)
	if m := f.next(t); m != "WATCHDOG=1" {
		t.Fatalf("got %q after recovery, want WATCHDOG=1", m)
	}
	if logs.FilterMessageSnippet("healthy again").Len() != 1 {
		t.Fatal("recovery not logged")
	}

	// Cancelling ctx ends the loop.
	cancel()
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
		t.Fatal("RunWatchdog did not return after ctx ended")
	}
}
