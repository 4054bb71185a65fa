// Package openbcitest is a fake OpenBCI Cyton (with or without the Daisy
// module) and its dongle on the master side of a real pseudo-terminal, for
// tests of the openbci driver and of anything that runs it end to end.
//
//	fake := openbcitest.Start(t, openbcitest.Options{})
//	cfg := openbci.DefaultConfig()
//	cfg.Path = fake.Path()
//
// It answers v with a firmware v3 banner ending in $$$, d and x…X with
// their firmware v3 replies, streams 33-byte packets after b and stops
// after s. Sample values are known: SampleCounts and SampleAccel give what
// sample k carries, so a test can check every decoded value. Inject damages
// the stream while it runs; Options.Link puts the fake behind a stable
// link, so that a new fake is the same dongle plugged in again.
package openbcitest

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
)

// Options shape the fake board.
type Options struct {
	// Daisy makes the board a Cyton + Daisy: packets alternate between
	// channels 1–8 (odd counter) and 9–16 (even counter).
	Daisy bool
	// Rate is the packets per second sent while streaming; 0 is the real
	// board's 250.
	Rate float64
	// Packets ends the stream (the board goes quiet) after that many
	// packets have been counted, sent or dropped; 0 streams until s.
	Packets int
	// Drop lists packet indices (0 = the first packet after b) that are
	// counted but never sent: a radio loss, a jump in the sample counter.
	Drop []int
	// Garbage maps a packet index to bytes sent just before that packet.
	Garbage map[int][]byte
	// UnplugAfter closes the master (an unplug) once that many packets have
	// been counted; 0 never.
	UnplugAfter int
	// Silent never answers anything (a dongle whose board is off and that
	// says nothing, or a wrong port).
	Silent bool
	// BoardOff answers every command the way the dongle does when it cannot
	// reach the board: "Failure: Communications timeout - Device failed to
	// poll Host$$$".
	BoardOff bool
	// DefaultsFailure makes only d fail that way (the board went off after
	// the reset).
	DefaultsFailure bool
	// LegacyFirmware does not confirm channel settings (firmware v1/v2).
	LegacyFirmware bool
	// FirstCounter is the sample counter of the first packet; the default
	// (0) is 0 for the Cyton and 1 for the Daisy, so that pairs start with
	// channels 1–8.
	FirstCounter int
	// Counts, if set, gives the ADC count of channel ch in sample k instead
	// of SampleCounts (e.g. a signal with threshold crossings).
	Counts func(k, ch int) int32
	// NoiseBeforeBanner sends these bytes before the reply to v (packets
	// still in flight from an earlier session).
	NoiseBeforeBanner []byte
	// Link, when set, is a symbolic link to the fake's pseudo-terminal, as
	// udev makes /dev/serial/by-id/… for the dongle; Path is then Link. A
	// new fake started with the same Link after an Unplug is the dongle
	// plugged in again (see ptytest.NewAt).
	Link string
}

// Banner is the reply to v of a Cyton with firmware v3 (without the Daisy
// line when there is none).
const (
	Banner      = "OpenBCI V3 8-16 channel\nOn Board ADS1299 Device ID: 0x3E\nLIS3DH Device ID: 0x33\nFirmware: v3.1.2\n$$$"
	BannerDaisy = "OpenBCI V3 8-16 channel\nOn Board ADS1299 Device ID: 0x3E\nOn Daisy ADS1299 Device ID: 0x3E\nLIS3DH Device ID: 0x33\nFirmware: v3.1.2\n$$$"
	// FailureReply is what the dongle says when the board does not answer.
	FailureReply = "Failure: Communications timeout - Device failed to poll Host$$$"
)

// FakeCyton is the fake board. Its methods may be called from any goroutine.
type FakeCyton struct {
	pty  *ptytest.PTY
	opt  Options
	drop map[int]bool

	mu        sync.Mutex
	received  []byte
	commands  []string
	streaming bool
	next      int // next packet index to count
	sent      int // packets sent
	unplugged bool
	changed   chan struct{} // closed and replaced on every change
	mangles   map[int]func(k int, packet []byte) []byte
	lastFault int // the last packet index given to Inject

	wmu  sync.Mutex // serialises writes to the master
	done chan struct{}
	wg   sync.WaitGroup
}

// Start makes a pseudo-terminal, runs the fake board on its master and
// returns it; the driver opens Path. Everything stops at the end of the test.
// The test's own handle on the slave is released, so the driver (or an
// ephysd child process) is the only one holding it.
func Start(t testing.TB, opt Options) *FakeCyton {
	t.Helper()
	if opt.Rate <= 0 {
		opt.Rate = 250
	}
	var p *ptytest.PTY
	if opt.Link != "" {
		p = ptytest.NewAt(t, opt.Link)
	} else {
		p = ptytest.New(t)
	}
	f := &FakeCyton{pty: p, opt: opt, drop: map[int]bool{}, changed: make(chan struct{}), done: make(chan struct{}),
		mangles: map[int]func(int, []byte) []byte{}, lastFault: -1}
	for _, k := range opt.Drop {
		f.drop[k] = true
	}
	f.pty.ReleaseSlave()
	f.wg.Add(2)
	go f.readLoop()
	go f.streamLoop()
	t.Cleanup(f.Close)
	return f
}

// Path is the device path for the driver.
func (f *FakeCyton) Path() string { return f.pty.Path }

// Close stops the fake and closes the pseudo-terminal.
func (f *FakeCyton) Close() {
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

// Unplug closes the master side: the driver's reads fail as when the
// dongle is pulled out. The fake stops (its goroutines end).
func (f *FakeCyton) Unplug() {
	f.mu.Lock()
	f.unplugged = true
	f.changedLocked()
	f.mu.Unlock()
	f.pty.Unplug()
}

// Inject damages the stream at run time: the next packet not yet sent
// (after those given to earlier Injects) is replaced by mangle(k, packet),
// where k is its index and packet its 33 bytes (mangle may change them in
// place). mangle can prepend garbage, cut the packet short, corrupt its
// bytes or return nothing. Inject returns k. A packet in Drop is not sent
// whatever mangle does.
func (f *FakeCyton) Inject(mangle func(k int, packet []byte) []byte) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := max(f.next, f.lastFault+1)
	f.mangles[k] = mangle
	f.lastFault = k
	return k
}

// Received returns every byte the board received, in order.
func (f *FakeCyton) Received() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.received)
}

// Commands returns the commands received: single characters, and whole
// x…X channel settings.
func (f *FakeCyton) Commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.commands...)
}

// Streaming reports whether the board is streaming.
func (f *FakeCyton) Streaming() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.streaming
}

// Sent is the number of packets written so far.
func (f *FakeCyton) Sent() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent
}

// WaitReceived waits until the received bytes end with suffix, or fails
// the test after timeout.
func (f *FakeCyton) WaitReceived(t testing.TB, suffix string, timeout time.Duration) {
	t.Helper()
	if !f.wait(func() bool { return bytes.HasSuffix(f.received, []byte(suffix)) }, timeout) {
		t.Fatalf("openbcitest: the board did not receive %q within %v (received %q)", suffix, timeout, f.Received())
	}
}

// WaitSent waits until n packets were counted (sent or dropped), or fails
// the test after timeout.
func (f *FakeCyton) WaitSent(t testing.TB, n int, timeout time.Duration) {
	t.Helper()
	if !f.wait(func() bool { return f.next >= n }, timeout) {
		t.Fatalf("openbcitest: %d packets not sent within %v (sent %d)", n, timeout, f.Sent())
	}
}

func (f *FakeCyton) wait(cond func() bool, timeout time.Duration) bool {
	deadline := time.After(timeout)
	for {
		f.mu.Lock()
		ok := cond()
		ch := f.changed
		f.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ch:
		case <-deadline:
			return false
		}
	}
}

func (f *FakeCyton) changedLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *FakeCyton) write(b []byte) {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	_, _ = f.pty.Master.Write(b)
}

// readLoop reads the driver's commands and answers them.
func (f *FakeCyton) readLoop() {
	defer f.wg.Done()
	buf := make([]byte, 256)
	var pending []byte // an unfinished x…X
	for {
		n, err := f.pty.Read(buf) // waits while nobody holds the slave
		if err != nil {
			return // closed: unplugged, or the test is over
		}
		f.mu.Lock()
		f.received = append(f.received, buf[:n]...)
		f.changedLocked()
		f.mu.Unlock()
		for _, c := range buf[:n] {
			if len(pending) > 0 || c == 'x' {
				pending = append(pending, c)
				if c == 'X' || len(pending) == 9 {
					f.command(string(pending))
					pending = pending[:0]
				}
				continue
			}
			f.command(string(c))
		}
	}
}

func (f *FakeCyton) command(cmd string) {
	f.mu.Lock()
	f.commands = append(f.commands, cmd)
	f.changedLocked()
	f.mu.Unlock()
	if f.opt.Silent {
		return
	}
	if f.opt.BoardOff && cmd != "s" {
		f.write([]byte(FailureReply))
		return
	}
	switch {
	case cmd == "v":
		f.setStreaming(false)
		f.write(f.opt.NoiseBeforeBanner)
		if f.opt.Daisy {
			f.write([]byte(BannerDaisy))
		} else {
			f.write([]byte(Banner))
		}
	case cmd == "d":
		if f.opt.DefaultsFailure {
			f.write([]byte(FailureReply))
			return
		}
		f.write([]byte("updating channel settings to default$$$"))
	case len(cmd) == 9 && cmd[0] == 'x':
		if f.opt.LegacyFirmware {
			return
		}
		if cmd[8] != 'X' {
			f.write([]byte("Failure: 9th character is not the upper case 'X'$$$"))
			return
		}
		ch := bytes.IndexByte([]byte("12345678QWERTYUI"), cmd[1]) + 1
		f.write(fmt.Appendf(nil, "Success: Channel set for %d$$$", ch))
	case cmd == "b":
		f.setStreaming(true)
	case cmd == "s":
		f.setStreaming(false)
	}
}

func (f *FakeCyton) setStreaming(on bool) {
	f.mu.Lock()
	f.streaming = on
	f.changedLocked()
	f.mu.Unlock()
}

// streamLoop sends packets at the configured rate while streaming.
func (f *FakeCyton) streamLoop() {
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
		for f.next < due && (f.opt.Packets == 0 || f.next < f.opt.Packets) {
			k := f.next
			if g, ok := f.opt.Garbage[k]; ok {
				out = append(out, g...)
			}
			if m := f.mangles[k]; m != nil && !f.drop[k] {
				delete(f.mangles, k)
				out = append(out, m(k, appendPacket(nil, k, f.opt.Daisy, f.opt.FirstCounter, f.opt.Counts))...)
				f.sent++
			} else if !f.drop[k] {
				out = appendPacket(out, k, f.opt.Daisy, f.opt.FirstCounter, f.opt.Counts)
				f.sent++
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

// counter is the sample counter byte of packet k.
func counter(k int, daisy bool, first int) byte {
	if first == 0 && daisy {
		first = 1
	}
	return byte(k + first)
}

// AppendPacket appends packet k of the fake's stream to dst. In Cyton mode
// packet k carries sample k; with the Daisy, packet 2j carries channels
// 1–8 and packet 2j+1 channels 9–16 of sample j.
func AppendPacket(dst []byte, k int, daisy bool, firstCounter int) []byte {
	return appendPacket(dst, k, daisy, firstCounter, nil)
}

func appendPacket(dst []byte, k int, daisy bool, firstCounter int, counts func(k, ch int) int32) []byte {
	if counts == nil {
		counts = SampleCounts
	}
	sample, base := k, 0
	if daisy {
		sample, base = k/2, 8*(k%2)
	}
	dst = append(dst, 0xA0, counter(k, daisy, firstCounter))
	for c := 0; c < 8; c++ {
		v := uint32(counts(sample, base+c))
		dst = append(dst, byte(v>>16), byte(v>>8), byte(v))
	}
	var acc [3]int16
	if base == 0 {
		acc = SampleAccel(sample)
	}
	for _, a := range acc {
		dst = append(dst, byte(uint16(a)>>8), byte(a))
	}
	return append(dst, 0xC0)
}

// SampleCounts is the ADC count of channel ch (0-based) in sample k: values
// spread over the whole int24 range, negative ones included, so the bytes
// of a stream hold plenty of A0 and C0–C6.
func SampleCounts(k, ch int) int32 {
	v := (int64(k)*7919 + int64(ch)*104729 + int64(k*ch)*31) % (1 << 24)
	return int32(v - 1<<23)
}

// SampleAccel is the accelerometer reading in sample k: a new non-zero
// value every tenth sample, zeros (no new value) in between.
func SampleAccel(k int) [3]int16 {
	if k%10 != 0 {
		return [3]int16{}
	}
	return [3]int16{int16(100 + k%1000), int16(-200 - k%500), 8000}
}

// HeldAccel is the accelerometer value a driver should report for sample k
// when it holds the last reading (samples before 0 do not exist).
func HeldAccel(k int) [3]int16 { return SampleAccel(k - k%10) }
