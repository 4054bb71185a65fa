// Package pulsepaltest is a fake Sanworks Pulse Pal 2 on the master side
// of a real pseudo-terminal: the driver (or the whole daemon) opens Path
// as it would open /dev/ttyACM0. The fake answers the handshake with a
// configurable firmware version, acknowledges fixed voltages (4F) and
// parameters (4A) with 01, and records every message with its arrival
// time.
package pulsepaltest

import (
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
)

// Options configure the fake.
type Options struct {
	// Firmware is the version reported by the handshake (default 23).
	Firmware uint32
	// Silent makes the fake ignore the handshake (a device that is not a
	// Pulse Pal, or one in Bpod mode).
	Silent bool
	// NoRecord keeps nothing (for benchmarks: the fake then allocates
	// nothing per message).
	NoRecord bool
	// Link, when set, is a symbolic link to the fake's pseudo-terminal (as
	// udev makes /dev/serial/by-id/… for the device); Path is then Link. A
	// new fake started with the same Link after an Unplug is the device
	// plugged in again (see ptytest.NewAt).
	Link string
}

// Message is one message the fake received: the opcode (after D5) and its
// argument bytes.
type Message struct {
	Op   byte
	Args []byte
	At   time.Time
}

func (m Message) String() string { return fmt.Sprintf("D5 %02X % X", m.Op, m.Args) }

// Trigger is one soft-trigger message (D5 4D mask; bit 0 = channel 1).
type Trigger struct {
	Mask byte
	At   time.Time
}

// Voltage is one fixed-voltage message (D5 4F ch lo hi).
type Voltage struct {
	Channel int
	Code    uint16
	Volts   float64 // Code decoded: Code/65535 × 20 − 10
	At      time.Time
}

// FakePulsePal is the fake device.
type FakePulsePal struct {
	// Path is the serial device the driver opens.
	Path string

	pty  *ptytest.PTY
	opts Options

	mu           sync.Mutex
	messages     []Message
	triggers     []Trigger
	voltages     []Voltage
	junk         []byte
	disconnected bool
	done         chan struct{}
	wmu          sync.Mutex // serialises writes to the master
}

// Start runs a fake Pulse Pal until the test ends.
func Start(t testing.TB, opts Options) *FakePulsePal {
	t.Helper()
	if opts.Firmware == 0 {
		opts.Firmware = 23
	}
	var p *ptytest.PTY
	if opts.Link != "" {
		p = ptytest.NewAt(t, opts.Link)
	} else {
		p = ptytest.New(t)
	}
	f := &FakePulsePal{Path: p.Path, pty: p, opts: opts, done: make(chan struct{})}
	// The driver (possibly an ephysd child process) must be the only one
	// holding the port, or it would be reported busy.
	p.ReleaseSlave()
	go f.run()
	t.Cleanup(f.Close)
	return f
}

// Close unplugs the fake and waits until it has stopped.
func (f *FakePulsePal) Close() {
	f.pty.Close()
	<-f.done
}

// Send writes raw bytes to the driver as if the device sent them, at run
// time: garbage, a corrupted confirmation.
func (f *FakePulsePal) Send(raw []byte) error {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	_, err := f.pty.Master.Write(raw)
	return err
}

// paramSize is the size of the value of parameter code (D5 4A code ch
// value): voltages are uint16, times uint32 (50 µs units), the rest bytes.
func paramSize(code byte) int {
	switch code {
	case 2, 3, 17:
		return 2
	case 4, 5, 6, 7, 8, 9, 10, 11:
		return 4
	}
	return 1
}

func (f *FakePulsePal) run() {
	defer close(f.done)
	r := &reader{f: f.pty}
	for {
		b, err := r.byte()
		if err != nil {
			return
		}
		if b != 0xD5 {
			f.mu.Lock()
			f.junk = append(f.junk, b)
			f.mu.Unlock()
			continue
		}
		op, err := r.byte()
		if err != nil {
			return
		}
		var args []byte
		var reply []byte
		switch op {
		case 0x48:
			if !f.opts.Silent {
				reply = binary.LittleEndian.AppendUint32([]byte{0x4B}, f.opts.Firmware)
			}
		case 0x4D:
			args, err = r.n(1)
		case 0x4F:
			args, err = r.n(3)
			reply = []byte{0x01}
		case 0x4A:
			var head []byte
			if head, err = r.n(2); err == nil {
				code, ch := head[0], head[1]
				var val []byte
				val, err = r.n(paramSize(code))
				args = append([]byte{code, ch}, val...)
			}
			reply = []byte{0x01}
		case 0x50, 0x51:
		}
		if err != nil {
			return
		}
		if f.opts.NoRecord {
			if reply != nil {
				if err := f.Send(reply); err != nil {
					return
				}
			}
			continue
		}
		args = append([]byte(nil), args...)
		now := time.Now()
		f.mu.Lock()
		f.messages = append(f.messages, Message{Op: op, Args: args, At: now})
		switch op {
		case 0x4D:
			f.triggers = append(f.triggers, Trigger{Mask: args[0], At: now})
		case 0x4F:
			code := binary.LittleEndian.Uint16(args[1:])
			f.voltages = append(f.voltages, Voltage{Channel: int(args[0]), Code: code, Volts: float64(code)/65535*20 - 10, At: now})
		case 0x51:
			f.disconnected = true
		}
		f.mu.Unlock()
		if reply != nil {
			if err := f.Send(reply); err != nil {
				return
			}
		}
	}
}

type reader struct {
	f   *ptytest.PTY
	buf [256]byte
	r   []byte
	arg [8]byte
}

func (r *reader) byte() (byte, error) {
	for len(r.r) == 0 {
		n, err := r.f.Read(r.buf[:])
		if err != nil {
			return 0, err
		}
		r.r = r.buf[:n]
	}
	b := r.r[0]
	r.r = r.r[1:]
	return b, nil
}

// n reads k bytes into a buffer reused by the next call.
func (r *reader) n(k int) ([]byte, error) {
	out := r.arg[:k]
	for i := range out {
		b, err := r.byte()
		if err != nil {
			return nil, err
		}
		out[i] = b
	}
	return out, nil
}

// Messages returns every message received, in order.
func (f *FakePulsePal) Messages() []Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Message(nil), f.messages...)
}

// Triggers returns the soft-trigger messages received.
func (f *FakePulsePal) Triggers() []Trigger {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Trigger(nil), f.triggers...)
}

// Voltages returns the fixed-voltage messages received.
func (f *FakePulsePal) Voltages() []Voltage {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Voltage(nil), f.voltages...)
}

// Junk returns bytes received outside any message.
func (f *FakePulsePal) Junk() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]byte(nil), f.junk...)
}

// Disconnected tells whether the driver sent D5 51.
func (f *FakePulsePal) Disconnected() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.disconnected
}

// WaitMessages waits until n messages have arrived (or timeout) and returns
// them.
func (f *FakePulsePal) WaitMessages(n int, timeout time.Duration) []Message {
	deadline := time.Now().Add(timeout)
	for {
		m := f.Messages()
		if len(m) >= n || time.Now().After(deadline) {
			return m
		}
		time.Sleep(time.Millisecond)
	}
}

// Unplug closes the master: the driver's reads and writes fail as when the
// USB cable is pulled.
func (f *FakePulsePal) Unplug() { f.pty.Unplug() }
