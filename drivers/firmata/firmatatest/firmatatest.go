// Package firmatatest is a fake Arduino running StandardFirmata on the
// master side of a real pseudo-terminal. Like an Uno it "resets" when the
// port is opened (seen as the driver setting the line rate), and sends its
// version report F9 02 05 after a configurable delay; it answers version
// queries, records pin modes and digital port writes, and reports input
// changes on ports whose reporting is enabled.
package firmatatest

import (
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
)

// Options configure the fake.
type Options struct {
	// ResetDelay is how long after the port is opened the version report
	// comes (an Uno's bootloader: about 1.6 s); default 50 ms.
	ResetDelay time.Duration
	// NoReportOnReset sends no version report at reset (it is still sent
	// when asked with F9) — a board that does not reset on open.
	NoReportOnReset bool
	// Silent answers nothing (no Firmata sketch).
	Silent bool
	// NoRecord keeps no raw bytes or port writes (for benchmarks).
	NoRecord bool
	// Link, when set, is a symbolic link to the fake's pseudo-terminal (as
	// udev makes /dev/serial/by-id/… for the board); Path is then Link. A
	// new fake started with the same Link after an Unplug is the board
	// plugged in again (see ptytest.NewAt).
	Link string
}

// PortWrite is one digital message 0x90|port LSB MSB from the driver.
type PortWrite struct {
	Port  int
	Value byte // the 8 pin levels
	At    time.Time
}

// FakeArduino is the fake board.
type FakeArduino struct {
	// Path is the serial device the driver opens.
	Path string

	pty  *ptytest.PTY
	opts Options

	mu        sync.Mutex
	modes     map[int]byte
	writes    []PortWrite
	raw       []byte
	reporting [16]bool
	inputs    [16]byte
	queries   int
	done      chan struct{}
	wmu       sync.Mutex // serialises writes to the master
}

// Start runs a fake board until the test ends.
func Start(t testing.TB, opts Options) *FakeArduino {
	t.Helper()
	if opts.ResetDelay == 0 {
		opts.ResetDelay = 50 * time.Millisecond
	}
	var p *ptytest.PTY
	if opts.Link != "" {
		p = ptytest.NewAt(t, opts.Link)
	} else {
		p = ptytest.New(t)
	}
	// The driver must be the only one holding the slave, so that closing
	// it is the last close (the fake's reads wait meanwhile).
	p.ReleaseSlave()
	f := &FakeArduino{Path: p.Path, pty: p, opts: opts, modes: map[int]byte{}, done: make(chan struct{})}
	go f.reset()
	go f.run()
	t.Cleanup(f.Close)
	return f
}

// reset waits until the driver opens the port (serialport sets the
// line rate, which the master sees in the terminal settings), then, after
// ResetDelay, sends the version report.
func (f *FakeArduino) reset() {
	if f.opts.Silent || f.opts.NoReportOnReset {
		return
	}
	conn, err := f.pty.Master.SyscallConn()
	if err != nil {
		return
	}
	for i := 0; i < 10000; i++ {
		var speed uint32
		if conn.Control(func(fd uintptr) {
			if tio, err := unix.IoctlGetTermios(int(fd), unix.TCGETS); err == nil {
				speed = tio.Cflag & unix.CBAUD
			}
		}) != nil {
			return // unplugged
		}
		if speed != 0 && speed != unix.B38400 { // 38400: the pty's default
			break
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(f.opts.ResetDelay)
	f.send(0xF9, 0x02, 0x05)
}

func (f *FakeArduino) send(b ...byte) error {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	_, err := f.pty.Master.Write(b)
	return err
}

func (f *FakeArduino) run() {
	defer close(f.done)
	var buf [256]byte
	var msg [3]byte
	k, need := 0, 0
	for {
		n, err := f.pty.Read(buf[:])
		if err != nil {
			return
		}
		if !f.opts.NoRecord {
			f.mu.Lock()
			f.raw = append(f.raw, buf[:n]...)
			f.mu.Unlock()
		}
		for _, c := range buf[:n] {
			if c&0x80 != 0 {
				msg[0], k = c, 1
				switch {
				case c == 0xF9:
					k = 0
					f.mu.Lock()
					f.queries++
					f.mu.Unlock()
					if !f.opts.Silent {
						f.send(0xF9, 0x02, 0x05)
					}
				case c == 0xF4, c == 0xF5, c&0xF0 == 0x90, c&0xF0 == 0xD0, c&0xF0 == 0xC0:
					need = 3
					if c&0xF0 == 0xD0 || c&0xF0 == 0xC0 {
						need = 2
					}
				default:
					k = 0 // sysex and others: ignored
				}
				continue
			}
			if k == 0 {
				continue
			}
			msg[k] = c
			k++
			if k < need {
				continue
			}
			k = 0
			f.apply(msg[:need])
		}
	}
}

func (f *FakeArduino) apply(m []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case m[0] == 0xF4:
		f.modes[int(m[1])] = m[2]
	case m[0] == 0xF5:
		pin := int(m[1])
		v := f.portLevels(pin / 8)
		if m[2] != 0 {
			v |= 1 << uint(pin%8)
		} else {
			v &^= 1 << uint(pin%8)
		}
		f.writes = append(f.writes, PortWrite{Port: pin / 8, Value: v, At: time.Now()})
	case m[0]&0xF0 == 0x90 && f.opts.NoRecord:
	case m[0]&0xF0 == 0x90:
		f.writes = append(f.writes, PortWrite{Port: int(m[0] & 0x0F), Value: m[1]&0x7F | m[2]<<7, At: time.Now()})
	case m[0]&0xF0 == 0xD0:
		f.reporting[m[0]&0x0F] = m[1] != 0
		if m[1] != 0 {
			p := m[0] & 0x0F
			f.send(0x90|p, f.inputs[p]&0x7F, f.inputs[p]>>7)
		}
	}
}

func (f *FakeArduino) portLevels(port int) byte {
	for i := len(f.writes) - 1; i >= 0; i-- {
		if f.writes[i].Port == port {
			return f.writes[i].Value
		}
	}
	return 0
}

// SetInput drives input pin to level; if its port reports, the fake sends
// the port's report 0x90|port LSB MSB.
func (f *FakeArduino) SetInput(pin int, high bool) {
	f.mu.Lock()
	p := pin / 8
	if high {
		f.inputs[p] |= 1 << uint(pin%8)
	} else {
		f.inputs[p] &^= 1 << uint(pin%8)
	}
	v, on := f.inputs[p], f.reporting[p]
	f.mu.Unlock()
	if on {
		f.send(0x90|byte(p), v&0x7F, v>>7)
	}
}

// PinModes returns the modes set with F4 (pin → mode; 1 = output).
func (f *FakeArduino) PinModes() map[int]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[int]byte{}
	for k, v := range f.modes {
		out[k] = v
	}
	return out
}

// PortWrites returns the digital port messages received.
func (f *FakeArduino) PortWrites() []PortWrite {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]PortWrite(nil), f.writes...)
}

// Raw returns every byte received.
func (f *FakeArduino) Raw() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]byte(nil), f.raw...)
}

// Reporting tells whether port reporting was enabled (D0|port 01).
func (f *FakeArduino) Reporting(port int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reporting[port]
}

// Queries is the number of version queries (F9) received.
func (f *FakeArduino) Queries() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.queries
}

// Unplug closes the master: the driver's reads and writes fail. The fake
// stops (its goroutines end).
func (f *FakeArduino) Unplug() { f.pty.Unplug() }

// Close unplugs the fake and waits for it to stop.
func (f *FakeArduino) Close() {
	f.pty.Close()
	<-f.done
}

// Send writes raw bytes to the driver as if the board sent them, at run
// time: garbage, a message cut short or corrupted.
func (f *FakeArduino) Send(raw []byte) error { return f.send(raw...) }
