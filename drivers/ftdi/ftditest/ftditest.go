// Package ftditest is a pure-Go fake FTDI FT232H (or FT2232H) for driver
// tests: it implements usb.Device and answers like the chip — vendor
// control requests (reset, latency timer, bit mode, read pins), bulk OUT
// writes recorded with their arrival times, bulk IN data with the two
// modem-status bytes at the start of every max-packet-size chunk, sync
// bitbang (one pin sample queued for each byte written), usb.ErrTimeout
// when idle and usb.ErrNoDevice after Unplug.
package ftditest

import (
	"fmt"
	"sync"
	"time"

	"github.com/ephysd/ephysd/drivers/usb"
)

// FTDI vendor requests.
const (
	ReqReset      = 0x00
	ReqSetLatency = 0x09
	ReqGetLatency = 0x0A
	ReqSetBitMode = 0x0B
	ReqReadPins   = 0x0C
)

// ModemStatus is the two status bytes the chip puts at the start of every
// bulk IN packet.
var ModemStatus = [2]byte{0x31, 0x60}

// Request is one control transfer the fake received.
type Request struct {
	RequestType, Request uint8
	Value, Index         uint16
	At                   time.Time
}

func (r Request) String() string {
	return fmt.Sprintf("%#02x req %#02x value %#04x index %d", r.RequestType, r.Request, r.Value, r.Index)
}

// Write is one bulk OUT transfer.
type Write struct {
	Endpoint uint8
	Data     []byte
	At       time.Time
}

// FT232H is the fake chip. The zero value is not usable: call New.
type FT232H struct {
	// MaxPacket is the bulk max packet size: 512 (high speed, default) or
	// 64 (full speed, like an FT232R).
	MaxPacket int

	mu        sync.Mutex
	cond      *sync.Cond
	requests  []Request
	writes    []Write
	record    bool
	latency   byte
	mode      byte
	mask      byte
	out       byte // output latch
	inputs    byte // levels driven onto the pins from outside
	inQueue   []byte
	rawIn     [][]byte // whole transfers to return as they are
	unplugged bool
	closed    bool
}

var _ usb.Device = (*FT232H)(nil)

// New returns a high-speed fake with a 16 ms latency timer (the chip's
// default) and recording on.
func New() *FT232H {
	f := &FT232H{MaxPacket: 512, latency: 16, record: true}
	f.cond = sync.NewCond(&f.mu)
	return f
}

// SetRecording turns recording of requests and writes on or off (off for
// benchmarks, so that the fake does not allocate).
func (f *FT232H) SetRecording(on bool) {
	f.mu.Lock()
	f.record = on
	f.mu.Unlock()
}

// SetInputs sets the levels external circuits drive onto the pins (the
// input pins read them; output pins read their latch).
func (f *FT232H) SetInputs(levels byte) {
	f.mu.Lock()
	f.inputs = levels
	f.mu.Unlock()
}

// QueueIn queues data bytes for bulk IN reads; the fake adds the modem
// status bytes per packet.
func (f *FT232H) QueueIn(data []byte) {
	f.mu.Lock()
	f.inQueue = append(f.inQueue, data...)
	f.cond.Broadcast()
	f.mu.Unlock()
}

// QueueRawIn queues one bulk IN transfer returned exactly as given, before
// any queued data: no status bytes are added, so a test can hand the
// driver a damaged transfer (a packet too short for its status bytes).
func (f *FT232H) QueueRawIn(transfer []byte) {
	f.mu.Lock()
	f.rawIn = append(f.rawIn, append([]byte(nil), transfer...))
	f.cond.Broadcast()
	f.mu.Unlock()
}

// Unplug makes every later transfer fail with usb.ErrNoDevice.
func (f *FT232H) Unplug() {
	f.mu.Lock()
	f.unplugged = true
	f.cond.Broadcast()
	f.mu.Unlock()
}

// Requests returns the control requests received so far.
func (f *FT232H) Requests() []Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Request(nil), f.requests...)
}

// Writes returns the bulk OUT transfers received so far.
func (f *FT232H) Writes() []Write {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Write(nil), f.writes...)
}

// Pins is the current level of the eight pins.
func (f *FT232H) Pins() byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pinsLocked()
}

// BitMode returns the mode and output mask last set (0x0B).
func (f *FT232H) BitMode() (mode, mask byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mode, f.mask
}

// Closed tells whether Close was called.
func (f *FT232H) Closed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

func (f *FT232H) pinsLocked() byte { return f.out&f.mask | f.inputs&^f.mask }

func (f *FT232H) gone() error {
	if f.unplugged {
		return fmt.Errorf("fake FT232H: unplugged: %w", usb.ErrNoDevice)
	}
	if f.closed {
		return fmt.Errorf("fake FT232H: used after Close")
	}
	return nil
}

// Control answers the FTDI vendor requests.
func (f *FT232H) Control(requestType, request uint8, value, index uint16, data []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.gone(); err != nil {
		return 0, err
	}
	if f.record {
		f.requests = append(f.requests, Request{requestType, request, value, index, time.Now()})
	}
	switch {
	case requestType == usb.VendorOut && request == ReqReset:
		if value == 0 {
			f.inQueue = f.inQueue[:0]
		}
		return 0, nil
	case requestType == usb.VendorOut && request == ReqSetLatency:
		if value < 1 || value > 255 {
			return 0, fmt.Errorf("fake FT232H: latency %d out of range (pipe stall)", value)
		}
		f.latency = byte(value)
		return 0, nil
	case requestType == usb.VendorIn && request == ReqGetLatency && len(data) >= 1:
		data[0] = f.latency
		return 1, nil
	case requestType == usb.VendorOut && request == ReqSetBitMode:
		f.mode, f.mask = byte(value>>8), byte(value)
		return 0, nil
	case requestType == usb.VendorIn && request == ReqReadPins && len(data) >= 1:
		data[0] = f.pinsLocked()
		return 1, nil
	}
	return 0, fmt.Errorf("fake FT232H: request %#02x/%#02x not supported (pipe stall)", requestType, request)
}

// Write takes a bulk OUT transfer on endpoint 0x02: in a bitbang mode each
// byte sets the output latch; in sync bitbang mode each byte also queues
// one pin sample for bulk IN.
func (f *FT232H) Write(endpoint uint8, data []byte, timeout time.Duration) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.gone(); err != nil {
		return 0, err
	}
	if endpoint != 0x02 {
		return 0, fmt.Errorf("fake FT232H: no OUT endpoint %#02x", endpoint)
	}
	if f.record {
		f.writes = append(f.writes, Write{endpoint, append([]byte(nil), data...), time.Now()})
	}
	if f.mode == 0x01 || f.mode == 0x04 {
		for _, b := range data {
			if f.mode == 0x04 {
				// Sync bitbang samples the pins before the new byte is
				// clocked out.
				f.inQueue = append(f.inQueue, f.pinsLocked())
			}
			f.out = b
		}
		f.cond.Broadcast()
	}
	return len(data), nil
}

// Read returns queued bytes on endpoint 0x81 in packets of MaxPacket bytes,
// each starting with the two modem-status bytes. With nothing queued it
// waits up to timeout and returns usb.ErrTimeout.
func (f *FT232H) Read(endpoint uint8, buf []byte, timeout time.Duration) (int, error) {
	if endpoint != 0x81 {
		return 0, fmt.Errorf("fake FT232H: no IN endpoint %#02x", endpoint)
	}
	deadline := time.Now().Add(timeout)
	f.mu.Lock()
	defer f.mu.Unlock()
	for len(f.inQueue) == 0 && len(f.rawIn) == 0 {
		if err := f.gone(); err != nil {
			return 0, err
		}
		left := time.Until(deadline)
		if left <= 0 {
			return 0, usb.ErrTimeout
		}
		t := time.AfterFunc(left, func() { f.mu.Lock(); f.cond.Broadcast(); f.mu.Unlock() })
		f.cond.Wait()
		t.Stop()
	}
	if err := f.gone(); err != nil {
		return 0, err
	}
	if len(f.rawIn) > 0 {
		n := copy(buf, f.rawIn[0])
		f.rawIn = f.rawIn[1:]
		return n, nil
	}
	n := 0
	for len(f.inQueue) > 0 && len(buf)-n > 2 {
		k := min(f.MaxPacket-2, len(buf)-n-2, len(f.inQueue))
		n += copy(buf[n:], ModemStatus[:])
		n += copy(buf[n:], f.inQueue[:k])
		f.inQueue = f.inQueue[k:]
		if n%f.MaxPacket != 0 {
			break // a short packet ends the transfer
		}
	}
	return n, nil
}

// MaxPacketSize is MaxPacket for the bulk endpoints.
func (f *FT232H) MaxPacketSize(endpoint uint8) int {
	if endpoint == 0x02 || endpoint == 0x81 {
		return f.MaxPacket
	}
	return 0
}

// Close marks the fake closed.
func (f *FT232H) Close() error {
	f.mu.Lock()
	f.closed = true
	f.cond.Broadcast()
	f.mu.Unlock()
	return nil
}

// Opener hands out Dev when asked for its VID/PID (and Serial, if set).
type Opener struct {
	Dev      *FT232H
	VID, PID uint16 // default 0403:6014
	Serial   string
	// Opened records the interfaces Open was asked for.
	Opened []int
	mu     sync.Mutex
}

var _ usb.Opener = (*Opener)(nil)

func (o *Opener) id() usb.ID {
	id := usb.ID{VID: o.VID, PID: o.PID, Serial: o.Serial}
	if id.VID == 0 {
		id.VID, id.PID = 0x0403, 0x6014
	}
	return id
}

// Open returns Dev if id matches.
func (o *Opener) Open(id usb.ID, iface int) (usb.Device, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	me := o.id()
	if id.VID != me.VID || id.PID != me.PID || (id.Serial != "" && id.Serial != me.Serial) || o.Dev == nil {
		return nil, fmt.Errorf("usb %s: not found — is it plugged in?: %w", id, usb.ErrNoDevice)
	}
	o.Dev.mu.Lock()
	unplugged := o.Dev.unplugged
	o.Dev.mu.Unlock()
	if unplugged {
		return nil, fmt.Errorf("usb %s: not found — is it plugged in?: %w", id, usb.ErrNoDevice)
	}
	o.Opened = append(o.Opened, iface)
	return o.Dev, nil
}

// List lists Dev.
func (o *Opener) List() ([]usb.Info, error) {
	return []usb.Info{{ID: o.id(), Bus: 1, Address: 2, Manufacturer: "FTDI", Product: "Single RS232-HS"}}, nil
}
