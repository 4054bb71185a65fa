package streamdev

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ephysd/ephysd/drivers/stream"
	"github.com/ephysd/ephysd/drivers/usb"
)

// USB endpoints of the fake device.
const (
	EndpointIn  = stream.DefaultEndpointIn
	EndpointOut = stream.DefaultEndpointOut
)

// pipeCapacity is how many bytes the fake device queues for the host; a
// real-time device whose host does not read loses frames beyond it (as a
// device's FIFO overflows), a fast one waits.
const pipeCapacity = 1 << 20

// ErrOverflow is a bulk IN transfer whose buffer is not a whole number of
// max-size packets and too small for the packet that came (libusb's
// LIBUSB_ERROR_OVERFLOW).
var ErrOverflow = errors.New("usb: overflow — the transfer buffer is smaller than the device's packet")

// USBDevice is the device seen as a usb.Device: bulk IN on EndpointIn,
// bulk OUT on EndpointOut.
type USBDevice struct {
	d    *Device
	pipe *pipe
}

// USB returns the device as a fake usb.Device and starts it. Each device
// has one.
func (d *Device) USB() *USBDevice {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.usb != nil {
		return d.usb
	}
	p := newPipe(d.mps, d.cfg.Realtime)
	d.usb = &USBDevice{d: d, pipe: p}
	d.out = p.push
	d.mu.Unlock()
	d.startStreamer()
	d.mu.Lock()
	return d.usb
}

// Opener returns a usb.Opener that finds the device by VID, PID and
// (when given) serial number.
func (d *Device) Opener() usb.Opener { return opener{d} }

type opener struct{ d *Device }

func (o opener) Open(id usb.ID, iface int) (usb.Device, error) {
	d := o.d
	if d.unplugged.Load() || id.VID != d.cfg.VID || id.PID != d.cfg.PID || id.Serial != "" && id.Serial != d.announce.Serial {
		return nil, usb.ErrNoDevice
	}
	if iface != 0 {
		return nil, fmt.Errorf("usb %v: no interface %d (the device has interface 0)", id, iface)
	}
	return d.USB(), nil
}

func (o opener) List() ([]usb.Info, error) {
	if o.d.unplugged.Load() {
		return nil, nil
	}
	return []usb.Info{{ID: usb.ID{VID: o.d.cfg.VID, PID: o.d.cfg.PID, Serial: o.d.announce.Serial}, Product: o.d.announce.Name}}, nil
}

// Control is not used by the protocol: the fake stalls every request.
func (u *USBDevice) Control(requestType, request uint8, value, index uint16, data []byte) (int, error) {
	if u.pipe.gone() {
		return 0, usb.ErrNoDevice
	}
	return 0, errors.New("usb: control request stalled (the stream protocol uses bulk endpoints only)")
}

// Read performs one bulk IN transfer: whole packets of MaxPacketSize until
// buf is full or a short (or zero-length) packet ends the device's
// transfer; (0, usb.ErrTimeout) when nothing came within timeout.
func (u *USBDevice) Read(endpoint uint8, buf []byte, timeout time.Duration) (int, error) {
	if endpoint != EndpointIn {
		return 0, fmt.Errorf("usb: no IN endpoint %#x", endpoint)
	}
	return u.pipe.read(buf, timeout)
}

// Write performs a bulk OUT transfer: the device handles the commands in
// it before Write returns.
func (u *USBDevice) Write(endpoint uint8, data []byte, timeout time.Duration) (int, error) {
	if endpoint != EndpointOut {
		return 0, fmt.Errorf("usb: no OUT endpoint %#x", endpoint)
	}
	if u.pipe.gone() {
		return 0, usb.ErrNoDevice
	}
	u.d.receive(data)
	return len(data), nil
}

// MaxPacketSize is the bulk endpoints' wMaxPacketSize.
func (u *USBDevice) MaxPacketSize(endpoint uint8) int { return u.d.mps }

// Close releases the interface: the device stops streaming.
func (u *USBDevice) Close() error {
	u.d.mu.Lock()
	u.d.streaming = false
	u.d.epoch++
	u.d.mu.Unlock()
	u.pipe.reset()
	return nil
}

// pipe is the device's IN endpoint queue: bytes, and the lengths of the
// transfers the device queued (each ends with a short packet, or a
// zero-length packet when its length is a multiple of the packet size).
type pipe struct {
	mps      int
	realtime bool

	mu      sync.Mutex
	data    []byte
	head    int
	segs    []int // remaining length of each queued transfer
	seg0    int   // index of the current transfer in segs
	zlp     bool  // a zero-length packet waits for the next transfer
	isGone  bool
	closed  bool
	dropped int
	notify  chan struct{}
	space   chan struct{}
	timer   *time.Timer
}

func newPipe(mps int, realtime bool) *pipe {
	p := &pipe{mps: mps, realtime: realtime, data: make([]byte, 0, pipeCapacity), segs: make([]int, 0, 1024),
		notify: make(chan struct{}, 1), space: make(chan struct{}, 1), timer: time.NewTimer(time.Hour)}
	p.timer.Stop()
	return p
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// push queues one device transfer.
func (p *pipe) push(b []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if p.isGone || p.closed {
			return usb.ErrNoDevice
		}
		if len(p.data)-p.head+len(b) <= pipeCapacity {
			break
		}
		if p.realtime {
			p.dropped++ // FIFO full: the frame is lost
			return nil
		}
		p.mu.Unlock()
		<-p.space
		p.mu.Lock()
	}
	if len(p.data)+len(b) > cap(p.data) {
		n := copy(p.data, p.data[p.head:])
		p.data = p.data[:n]
		p.head = 0
	}
	if p.seg0 > 0 && p.seg0 == len(p.segs) {
		p.segs, p.seg0 = p.segs[:0], 0
	} else if p.seg0 > 512 {
		n := copy(p.segs, p.segs[p.seg0:])
		p.segs, p.seg0 = p.segs[:n], 0
	}
	p.data = append(p.data, b...)
	p.segs = append(p.segs, len(b))
	signal(p.notify)
	return nil
}

func (p *pipe) read(buf []byte, timeout time.Duration) (int, error) {
	deadline := false
	for {
		p.mu.Lock()
		if p.isGone {
			p.mu.Unlock()
			return 0, usb.ErrNoDevice
		}
		if p.closed {
			p.mu.Unlock()
			return 0, errors.New("usb: device closed")
		}
		if p.zlp {
			p.zlp = false
			p.mu.Unlock()
			return 0, nil
		}
		if p.seg0 < len(p.segs) {
			n, err := p.take(buf)
			p.mu.Unlock()
			signal(p.space)
			return n, err
		}
		p.mu.Unlock()
		if deadline {
			return 0, usb.ErrTimeout
		}
		p.timer.Reset(timeout)
		select {
		case <-p.notify:
			if !p.timer.Stop() {
				<-p.timer.C
			}
		case <-p.timer.C:
			deadline = true
		}
	}
}

// take moves packets into buf: called with data queued.
func (p *pipe) take(buf []byte) (int, error) {
	got := 0
	for p.seg0 < len(p.segs) {
		left := p.segs[p.seg0]
		if left == 0 { // an empty transfer: a zero-length packet
			p.seg0++
			return got, nil
		}
		pkt := min(p.mps, left)
		if pkt > len(buf)-got {
			if got == 0 {
				return 0, ErrOverflow
			}
			return got, nil
		}
		copy(buf[got:], p.data[p.head:p.head+pkt])
		p.head += pkt
		got += pkt
		left -= pkt
		p.segs[p.seg0] = left
		if left > 0 {
			if got == len(buf) {
				return got, nil
			}
			continue
		}
		p.seg0++
		if pkt < p.mps {
			return got, nil // short packet ends the transfer
		}
		if got == len(buf) {
			p.zlp = true // the ZLP completes the next transfer
		}
		return got, nil
	}
	return got, nil
}

func (p *pipe) reset() {
	p.mu.Lock()
	p.data, p.head = p.data[:0], 0
	p.segs, p.seg0 = p.segs[:0], 0
	p.zlp = false
	p.mu.Unlock()
	signal(p.space)
}

func (p *pipe) unplug() {
	p.mu.Lock()
	p.isGone = true
	p.mu.Unlock()
	signal(p.notify)
	signal(p.space)
}

func (p *pipe) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	signal(p.notify)
	signal(p.space)
}

func (p *pipe) gone() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.isGone
}
