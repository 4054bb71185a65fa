// Package spikerboxtest is a fake Backyard Brains SpikerBox on the master
// side of a real pseudo-terminal, for tests of the spikerbox driver and of
// anything that runs it end to end.
//
//	fake := spikerboxtest.Start(t, spikerboxtest.Options{})
//	cfg := spikerbox.DefaultConfig()
//	cfg.Path = fake.Path()
//
// It takes commands ending in ';' (c:N; sets the channel count, start:;
// streams, h:; stops, ?:; and b:; answer with message blocks) and streams
// 10-bit frames with known values: FrameValue(k, ch) is channel ch of
// frame k. Inject damages the stream while it runs; Options.Link puts the
// fake behind a stable link, so that a new fake is the same box plugged in
// again.
package spikerboxtest

import (
	"bytes"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
)

// Message escapes of the protocol.
var (
	MessageStart = []byte{0xFF, 0xFF, 0x01, 0x01, 0x80, 0xFF}
	MessageEnd   = []byte{0xFF, 0xFF, 0x01, 0x01, 0x81, 0xFF}
)

// Replies to ?:; and b:;.
const (
	InfoReply  = "FWV:1.0;HWT:NEURONSB;"
	BoardReply = "BRD:0;"
)

// Options shape the fake box.
type Options struct {
	// Channels is the channel count before any c:N; (default 2).
	Channels int
	// Rate is frames per second while streaming (default 10000).
	Rate float64
	// Frames ends the stream after that many frames were counted; 0 is
	// endless.
	Frames int
	// Garbage maps a frame index to bytes sent just before that frame.
	Garbage map[int][]byte
	// Events maps a frame index to an event number: the message block
	// EVNT:n; is sent just before that frame.
	Events map[int]int
	// MidFrameMessages maps a frame index to a message body sent after the
	// first byte of that frame (the parser must strip it from inside the
	// frame).
	MidFrameMessages map[int]string
	// UnplugAfter closes the master once that many frames were counted.
	UnplugAfter int
	// Link, when set, is a symbolic link to the fake's pseudo-terminal (as
	// udev makes /dev/serial/by-id/… for the box); Path is then Link. A new
	// fake started with the same Link after an Unplug is the box plugged
	// in again (see ptytest.NewAt).
	Link string
}

// FakeSpikerBox is the fake box. Its methods may be called from any
// goroutine.
type FakeSpikerBox struct {
	pty *ptytest.PTY
	opt Options

	mu        sync.Mutex
	received  []byte
	commands  []string
	channels  int
	streaming bool
	next      int
	unplugged bool
	changed   chan struct{}
	mangles   map[int]func(k int, frame []byte) []byte
	lastFault int

	wmu  sync.Mutex
	done chan struct{}
	wg   sync.WaitGroup
}

// Start makes a pseudo-terminal, runs the fake box on its master and
// returns it; the driver opens Path. The test's own handle on the slave is
// released, so the driver (or an ephysd child process) is the only holder.
func Start(t testing.TB, opt Options) *FakeSpikerBox {
	t.Helper()
	if opt.Channels <= 0 {
		opt.Channels = 2
	}
	if opt.Rate <= 0 {
		opt.Rate = 10000
	}
	var p *ptytest.PTY
	if opt.Link != "" {
		p = ptytest.NewAt(t, opt.Link)
	} else {
		p = ptytest.New(t)
	}
	f := &FakeSpikerBox{pty: p, opt: opt, channels: opt.Channels, changed: make(chan struct{}), done: make(chan struct{}),
		mangles: map[int]func(int, []byte) []byte{}, lastFault: -1}
	f.pty.ReleaseSlave()
	f.wg.Add(2)
	go f.readLoop()
	go f.streamLoop()
	t.Cleanup(f.Close)
	return f
}

// Path is the device path for the driver.
func (f *FakeSpikerBox) Path() string { return f.pty.Path }

// Close stops the fake and closes the pseudo-terminal.
func (f *FakeSpikerBox) Close() {
	f.mu.Lock()
	select {
	case <-f.done:
	default:
		close(f.done)
	}
	f.mu.Unlock()
	f.pty.Close()
	f.wg.Wait()
}

// Unplug closes the master: the driver's reads fail as when the box is
// pulled out. The fake stops (its goroutines end).
func (f *FakeSpikerBox) Unplug() {
	f.mu.Lock()
	f.unplugged = true
	f.changedLocked()
	f.mu.Unlock()
	f.pty.Unplug()
}

// Inject damages the stream at run time: the next frame not yet sent
// (after those given to earlier Injects) is replaced by mangle(k, frame),
// where k is its index and frame its bytes (mangle may change them in
// place). mangle can prepend garbage, cut the frame short, corrupt its
// bytes or return nothing. Inject returns k.
func (f *FakeSpikerBox) Inject(mangle func(k int, frame []byte) []byte) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := max(f.next, f.lastFault+1)
	f.mangles[k] = mangle
	f.lastFault = k
	return k
}

// Sent is the number of frames counted so far.
func (f *FakeSpikerBox) Sent() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.next
}

// WaitSent waits until n frames were counted, or fails the test after
// timeout.
func (f *FakeSpikerBox) WaitSent(t testing.TB, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		f.mu.Lock()
		ok := f.next >= n
		ch := f.changed
		f.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("spikerboxtest: %d frames not sent within %v (sent %d)", n, timeout, f.Sent())
		}
	}
}

// Received returns every byte the box received, in order.
func (f *FakeSpikerBox) Received() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.received)
}

// Commands returns the commands received, each with its ';'.
func (f *FakeSpikerBox) Commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.commands...)
}

// Channels is the box's current channel count.
func (f *FakeSpikerBox) Channels() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.channels
}

// WaitReceived waits until the received bytes end with suffix, or fails the
// test after timeout.
func (f *FakeSpikerBox) WaitReceived(t testing.TB, suffix string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		f.mu.Lock()
		ok := bytes.HasSuffix(f.received, []byte(suffix))
		ch := f.changed
		f.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("spikerboxtest: the box did not receive %q within %v (received %q)", suffix, timeout, f.Received())
		}
	}
}

func (f *FakeSpikerBox) changedLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *FakeSpikerBox) write(b []byte) {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	_, _ = f.pty.Master.Write(b)
}

// Message wraps body in the message escapes.
func Message(body string) []byte {
	b := append([]byte{}, MessageStart...)
	b = append(b, body...)
	return append(b, MessageEnd...)
}

func (f *FakeSpikerBox) readLoop() {
	defer f.wg.Done()
	buf := make([]byte, 256)
	var cmd []byte
	for {
		n, err := f.pty.Read(buf) // waits while nobody holds the slave
		if err != nil {
			return
		}
		f.mu.Lock()
		f.received = append(f.received, buf[:n]...)
		f.changedLocked()
		f.mu.Unlock()
		for _, c := range buf[:n] {
			cmd = append(cmd, c)
			if c == ';' {
				f.command(string(cmd))
				cmd = cmd[:0]
			}
		}
	}
}

func (f *FakeSpikerBox) command(cmd string) {
	f.mu.Lock()
	f.commands = append(f.commands, cmd)
	switch {
	case cmd == "start:;":
		f.streaming = true
	case cmd == "h:;":
		f.streaming = false
	case len(cmd) > 3 && cmd[:2] == "c:":
		if n, err := strconv.Atoi(cmd[2 : len(cmd)-1]); err == nil && n > 0 {
			f.channels = n
		}
	}
	f.changedLocked()
	f.mu.Unlock()
	switch cmd {
	case "?:;":
		f.write(Message(InfoReply))
	case "b:;":
		f.write(Message(BoardReply))
	}
}

func (f *FakeSpikerBox) streamLoop() {
	defer f.wg.Done()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var start time.Time
	var base int
	for {
		select {
		case <-f.done:
			return
		case <-tick.C:
		}
		f.mu.Lock()
		if f.unplugged {
			f.mu.Unlock()
			return
		}
		if !f.streaming {
			start = time.Time{}
			f.mu.Unlock()
			continue
		}
		if start.IsZero() {
			start, base = time.Now(), f.next
		}
		due := base + int(time.Since(start).Seconds()*f.opt.Rate) + 1
		var out []byte
		unplug := false
		for f.next < due && (f.opt.Frames == 0 || f.next < f.opt.Frames) {
			k := f.next
			out = append(out, f.opt.Garbage[k]...)
			if n, ok := f.opt.Events[k]; ok {
				out = append(out, Message("EVNT:"+strconv.Itoa(n)+";")...)
			}
			fr := AppendFrame(nil, k, f.channels)
			if m := f.mangles[k]; m != nil {
				delete(f.mangles, k)
				fr = m(k, fr)
			}
			if m, ok := f.opt.MidFrameMessages[k]; ok && len(fr) > 0 {
				out = append(out, fr[0])
				out = append(out, Message(m)...)
				out = append(out, fr[1:]...)
			} else {
				out = append(out, fr...)
			}
			f.next++
			if f.opt.UnplugAfter > 0 && f.next >= f.opt.UnplugAfter {
				unplug = true
				break
			}
		}
		f.changedLocked()
		f.mu.Unlock()
		if len(out) > 0 {
			f.write(out)
		}
		if unplug {
			f.Unplug()
			return
		}
	}
}

// AppendFrame appends frame k of channels channels to dst.
func AppendFrame(dst []byte, k, channels int) []byte {
	for ch := 0; ch < channels; ch++ {
		v := FrameValue(k, ch)
		hi := byte(v >> 7)
		if ch == 0 {
			hi |= 0x80
		}
		dst = append(dst, hi, byte(v&0x7F))
	}
	return dst
}

// FrameValue is the 10-bit value of channel ch in frame k: it sweeps the
// whole range 0–1023.
func FrameValue(k, ch int) uint16 {
	return uint16((k*37 + ch*101 + k*ch) % 1024)
}
