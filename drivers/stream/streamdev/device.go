// Package streamdev emulates a headstage that speaks the ephysd stream
// protocol (docs/stream-protocol.md): the device side of the handshake,
// START and STOP, and DATA frames made with the reference stream.Encoder,
// at real-time pace or as fast as the host reads, with faults on demand,
// planned (Config.Faults) or injected while it streams (Inject): garbage,
// truncated frames, corrupted CRCs, sync words and headers, dropped
// frames, unplugging.
//
// It runs over an io.ReadWriteCloser (the master of a pseudo-terminal, so
// the driver under test opens a real serial port) or as a fake usb.Device
// that behaves like a bulk device: transfers made of max-packet-size
// packets ended by a short or zero-length packet, usb.ErrTimeout when no
// data comes, usb.ErrNoDevice after the unplug.
//
// Samples come from the simulated headstage (drivers/sim, converted to
// counts with the announced scale) or from a function the caller gives.
package streamdev

import (
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/drivers/stream"
	"github.com/ephysd/ephysd/pipeline"
	"golang.org/x/sys/unix"
)

// FaultKind is a kind of fault the device injects.
type FaultKind int

// Faults.
const (
	// Garbage sends Fault.Bytes before the frame.
	Garbage FaultKind = iota
	// CorruptCRC flips one bit of the frame's first sample after the CRC
	// was computed, so the host drops the frame.
	CorruptCRC
	// Drop does not send the frame (as if the USB stack lost it); its
	// samples become a gap.
	Drop
	// Unplug disconnects the device instead of sending the frame.
	Unplug
	// Truncate sends only the first Fault.N bytes of the frame (bytes lost
	// on the way); its samples become a gap.
	Truncate
	// CorruptSync flips a bit of the frame's second sync byte: the host
	// does not see a frame start there.
	CorruptSync
	// CorruptHeader flips a bit of the frame's length field after the
	// header check was computed: the host sees a bad header.
	CorruptHeader
)

// Fault is a fault injected at one DATA frame, counted from 0 at START.
type Fault struct {
	Frame int
	Kind  FaultKind
	Bytes []byte // Garbage
	N     int    // Truncate
}

// Generator fills samples (n samples × channels counts, interleaved by
// sample) and the n digital words of the samples first…first+n−1.
type Generator func(first uint64, n int, samples []int32, digital []uint64)

// Config describes the emulated device.
type Config struct {
	// Announce is what the device announces; zero fields take the values
	// of DefaultAnnounce. A non-zero Version is announced whatever the
	// host offers (as old firmware that ignores HELLO's list would).
	Announce stream.Announce
	// Versions lists the protocol versions the device speaks (default
	// stream.Versions); a HELLO offering none of them gets an ERROR.
	Versions []uint8
	// Realtime paces frames to the announced rate; false sends them as
	// fast as the link takes them.
	Realtime bool
	// Generate makes the samples; nil uses the simulated headstage.
	Generate Generator
	// Seed seeds the simulated headstage.
	Seed int64
	// Faults to inject.
	Faults []Fault
	// Silent devices never answer HELLO.
	Silent bool
	// Answer, when set, is sent in answer to HELLO instead of an ANNOUNCE.
	Answer []byte
	// USB identity (default 1209:0001, serial Announce.Serial) and bulk
	// max packet size (default 512, high speed) of the fake USB device.
	VID, PID      uint16
	MaxPacketSize int
}

// DefaultAnnounce is a 64-channel, 30 kHz int16 headstage with 16 TTL
// inputs and 1 ms (30-sample) frames.
func DefaultAnnounce() stream.Announce {
	return stream.Announce{
		Version:      0,
		Format:       stream.Int16,
		DigitalBytes: 2,
		Channels:     64,
		MaxSamples:   30,
		RateMilliHz:  30000 * 1000,
		ScaleUV:      0.195,
		Name:         "streamdev",
		Serial:       "SD0001",
		Firmware:     "streamdev 1",
	}
}

// Device is an emulated headstage.
type Device struct {
	cfg      Config
	announce stream.Announce
	enc      *stream.Encoder
	faults   map[int]Fault
	gen      Generator
	mps      int

	mu        sync.Mutex
	cond      *sync.Cond
	streaming bool
	epoch     uint64
	closed    bool
	started   time.Time
	next      uint64
	frame     int
	lastFault int // the last frame index given to Inject

	wmu  sync.Mutex // held while a frame is written
	out  func([]byte) error
	link io.Closer
	usb  *USBDevice

	unplugged atomic.Bool
	frames    atomic.Uint64
	samples   atomic.Uint64
	commands  atomic.Uint64

	cmd  *stream.Decoder
	wbuf []byte
	runs sync.WaitGroup
}

// New makes a device.
func New(cfg Config) (*Device, error) {
	a := DefaultAnnounce()
	c := cfg.Announce
	if c.Format != 0 {
		a.Format = c.Format
	}
	if c.DigitalBytes != 0 {
		a.DigitalBytes = c.DigitalBytes
	}
	if c.Channels != 0 {
		a.Channels = c.Channels
	}
	if c.MaxSamples != 0 {
		a.MaxSamples = c.MaxSamples
	}
	if c.RateMilliHz != 0 {
		a.RateMilliHz = c.RateMilliHz
	}
	if c.ScaleUV != 0 {
		a.ScaleUV = c.ScaleUV
	}
	if c.ChannelScaleUV != nil {
		a.ChannelScaleUV = c.ChannelScaleUV
	}
	if c.Name != "" {
		a.Name = c.Name
	}
	if c.Serial != "" {
		a.Serial = c.Serial
	}
	if c.Firmware != "" {
		a.Firmware = c.Firmware
	}
	a.Version = c.Version
	if len(cfg.Versions) == 0 {
		cfg.Versions = stream.Versions
	}
	if cfg.VID == 0 && cfg.PID == 0 {
		cfg.VID, cfg.PID = stream.DefaultVID, stream.DefaultPID
	}
	enc, err := stream.NewEncoder(a)
	if err != nil {
		return nil, fmt.Errorf("streamdev: %w", err)
	}
	d := &Device{cfg: cfg, announce: a, enc: enc, faults: map[int]Fault{}, gen: cfg.Generate, mps: cfg.MaxPacketSize, cmd: stream.NewDecoder(0)}
	if d.mps == 0 {
		d.mps = 512
	}
	d.cond = sync.NewCond(&d.mu)
	d.lastFault = -1
	for _, f := range cfg.Faults {
		d.faults[f.Frame] = f
	}
	if d.gen == nil {
		if d.gen, err = simGenerator(a, cfg.Seed); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// Announce returns what the device announces (the defaults filled in).
func (d *Device) Announce() stream.Announce { return d.announce }

// Sent returns the DATA frames and samples sent so far.
func (d *Device) Sent() (frames, samples uint64) { return d.frames.Load(), d.samples.Load() }

// Streaming reports whether the device is streaming (between START and
// STOP).
func (d *Device) Streaming() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.streaming
}

// Inject adds a fault at run time, to the next DATA frame not yet made
// (after those given to earlier Injects), and returns that frame's index
// (f.Frame is ignored). Frames count from 0 at START.
func (d *Device) Inject(f Fault) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	f.Frame = max(d.frame, d.lastFault+1)
	d.faults[f.Frame] = f
	d.lastFault = f.Frame
	return f.Frame
}

// Frames is the number of DATA frames made since START: sent, or dropped,
// damaged or replaced by a fault.
func (d *Device) Frames() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.frame
}

// Commands is the number of good command frames the device received.
func (d *Device) Commands() uint64 { return d.commands.Load() }

// Serve runs the device on rw (the master of a pseudo-terminal) until rw
// fails, the device is unplugged or closed. It returns the read error that
// ended it (nil after Close or Unplug).
func (d *Device) Serve(rw io.ReadWriteCloser) error {
	rw, err := d.attach(rw)
	if err != nil {
		return err
	}
	return d.serve(rw)
}

// Go is Serve in the background: it attaches the device to rw before it
// returns, so that the caller may close rw (unplug) at any time after.
func (d *Device) Go(rw io.ReadWriteCloser) error {
	rw, err := d.attach(rw)
	if err != nil {
		return err
	}
	go d.serve(rw)
	return nil
}

func (d *Device) attach(rw io.ReadWriteCloser) (io.ReadWriteCloser, error) {
	if f, ok := rw.(*os.File); ok {
		pf, err := pollable(f)
		if err != nil {
			return nil, err
		}
		rw = struct {
			io.ReadWriter
			io.Closer
		}{pf, closers{pf, f}}
	}
	d.mu.Lock()
	d.out = func(p []byte) error { _, err := rw.Write(p); return err }
	d.link = rw
	d.mu.Unlock()
	d.startStreamer()
	return rw, nil
}

type closers []io.Closer

func (c closers) Close() error {
	var first error
	for _, x := range c {
		if err := x.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (d *Device) serve(rw io.ReadWriteCloser) error {
	buf := make([]byte, 4096)
	for {
		n, err := rw.Read(buf)
		if n > 0 {
			d.receive(buf[:n])
		}
		if err != nil {
			d.Close()
			if d.unplugged.Load() {
				return nil
			}
			return err
		}
	}
}

// pollable returns a non-blocking duplicate of f that the runtime poller
// serves, so that closing it ends a pending Read at once: a pty master from
// creack/pty is in blocking mode, and closing it while a Read is pending
// would leave it open (and the host would never see the unplug).
func pollable(f *os.File) (*os.File, error) {
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("streamdev: dup %s: %w", f.Name(), err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("streamdev: %s: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// Close stops the device's goroutines and closes its link.
func (d *Device) Close() {
	d.mu.Lock()
	already := d.closed
	d.closed = true
	d.streaming = false
	d.cond.Broadcast()
	link, u := d.link, d.usb
	d.mu.Unlock()
	if !already && link != nil {
		link.Close()
	}
	if u != nil {
		u.pipe.close()
	}
}

// Unplug disconnects the device: the pseudo-terminal master is closed, the
// fake USB device answers usb.ErrNoDevice from then on.
func (d *Device) Unplug() {
	d.unplugged.Store(true)
	d.mu.Lock()
	u := d.usb
	d.mu.Unlock()
	if u != nil {
		u.pipe.unplug()
	}
	d.Close()
}

// receive handles bytes from the host.
func (d *Device) receive(p []byte) {
	for len(p) > 0 {
		n := d.cmd.Feed(p)
		p = p[n:]
		for {
			f, ok := d.cmd.Next()
			if !ok {
				break
			}
			d.command(f)
		}
	}
}

func (d *Device) command(f stream.Frame) {
	d.commands.Add(1)
	switch f.Type {
	case stream.TypeHello:
		d.mu.Lock()
		d.streaming = false
		d.epoch++
		d.mu.Unlock()
		d.mu.Lock()
		u := d.usb
		d.mu.Unlock()
		if u != nil {
			u.pipe.reset() // a device drops what it has not sent
		}
		if d.cfg.Silent {
			return
		}
		if d.cfg.Answer != nil {
			d.write(d.cfg.Answer)
			return
		}
		offered, _ := stream.ParseHello(f.Payload)
		v := d.announce.Version
		if v == 0 {
			for _, o := range offered {
				for _, w := range d.cfg.Versions {
					if o == w && o > v {
						v = o
					}
				}
			}
		}
		d.wmu.Lock()
		if v == 0 {
			d.wbuf = stream.AppendError(d.wbuf[:0], stream.ErrCodeVersion, d.cfg.Versions,
				fmt.Sprintf("streamdev speaks protocol versions %v", d.cfg.Versions))
		} else {
			a := d.announce
			a.Version = v
			d.wbuf = stream.AppendFrame(d.wbuf[:0], stream.TypeAnnounce, a.AppendPayload(nil))
		}
		d.writeLocked(d.wbuf)
		d.wmu.Unlock()
	case stream.TypeStart:
		d.mu.Lock()
		if !d.streaming {
			d.streaming = true
			d.epoch++
			d.next, d.frame = 0, 0
			d.started = time.Now()
			d.cond.Broadcast()
		}
		d.mu.Unlock()
	case stream.TypeStop:
		d.mu.Lock()
		d.streaming = false
		d.epoch++
		d.mu.Unlock()
	}
}

func (d *Device) write(p []byte) {
	d.wmu.Lock()
	d.writeLocked(p)
	d.wmu.Unlock()
}

func (d *Device) writeLocked(p []byte) {
	if out := d.out; out != nil {
		out(p)
	}
}

func (d *Device) startStreamer() {
	d.runs.Add(1)
	go func() {
		defer d.runs.Done()
		d.stream()
	}()
}

// stream sends DATA frames while streaming.
func (d *Device) stream() {
	a := d.announce
	n := a.MaxSamples
	samples := make([]int32, n*a.Channels)
	digital := make([]uint64, n)
	buf := make([]byte, 0, a.Layout().MaxFrame())
	rate := a.Rate()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		d.mu.Lock()
		for !d.streaming && !d.closed {
			d.cond.Wait()
		}
		if d.closed {
			d.mu.Unlock()
			return
		}
		epoch, first, idx, t0 := d.epoch, d.next, d.frame, d.started
		f, fault := d.faults[idx]
		delete(d.faults, idx)
		d.next += uint64(n)
		d.frame++
		d.mu.Unlock()

		if d.cfg.Realtime {
			due := t0.Add(time.Duration(float64(first+uint64(n)) / rate * float64(time.Second)))
			if wait := time.Until(due); wait > 0 {
				timer.Reset(wait)
				<-timer.C
			}
		}
		d.gen(first, n, samples, digital)
		var err error
		buf, err = d.enc.AppendData(buf[:0], first, samples, digital)
		if err != nil {
			panic(fmt.Sprintf("streamdev: generator: %v", err))
		}
		if fault {
			switch f.Kind {
			case Unplug:
				d.Unplug()
				return
			case Drop:
				continue
			case CorruptCRC:
				buf[stream.HeaderSize+8] ^= 0x01
			case Truncate:
				buf = buf[:min(max(f.N, 0), len(buf))]
			case CorruptSync:
				buf[1] ^= 0x04
			case CorruptHeader:
				buf[4] ^= 0x02
			}
		}
		d.wmu.Lock()
		d.mu.Lock()
		ok := d.streaming && d.epoch == epoch
		d.mu.Unlock()
		if ok {
			if fault && f.Kind == Garbage {
				d.writeLocked(f.Bytes)
			}
			d.writeLocked(buf)
			d.frames.Add(1)
			d.samples.Add(uint64(n))
		}
		d.wmu.Unlock()
	}
}

// simGenerator converts the simulated headstage's µV to counts.
func simGenerator(a stream.Announce, seed int64) (Generator, error) {
	cfg := sim.DefaultConfig()
	cfg.Channels = a.Channels
	cfg.Rate = int(math.Round(a.Rate()))
	cfg.Realtime = false
	cfg.Seed = seed
	src, err := cfg.Open()
	if err != nil {
		return nil, fmt.Errorf("streamdev: the simulated headstage: %w", err)
	}
	if err := src.Start(); err != nil {
		return nil, err
	}
	pool, err := pipeline.NewPool(1, a.Channels, a.MaxSamples)
	if err != nil {
		return nil, err
	}
	b := pool.TryGet()
	nch := a.Channels
	scale := make([]float64, nch)
	for c := range scale {
		scale[c] = float64(a.Scale(c))
	}
	bits := a.Format.Bits()
	lo, hi := -math.Ldexp(1, bits-1), math.Ldexp(1, bits-1)-1
	mask := uint64(1)<<(8*a.DigitalBytes) - 1
	if a.DigitalBytes == 8 {
		mask = ^uint64(0)
	}
	return func(first uint64, n int, samples []int32, digital []uint64) {
		b.Reset()
		if err := src.ReadBlock(b); err != nil {
			panic(err)
		}
		for i := 0; i < n; i++ {
			for c := 0; c < nch; c++ {
				v := math.Round(float64(b.Data[c*b.Samples+i]) / scale[c])
				samples[i*nch+c] = int32(math.Max(lo, math.Min(hi, v)))
			}
			digital[i] = b.Digital[i] & mask
		}
	}, nil
}

// Pattern is a deterministic generator for exact tests: channel c of
// sample s is PatternValue(s, c) (covering the whole int16 range) and the
// digital word is PatternDigital(s), masked to the announced width.
func Pattern(a stream.Announce) Generator {
	nch := a.Channels
	mask := uint64(1)<<(8*a.DigitalBytes) - 1
	if a.DigitalBytes == 8 {
		mask = ^uint64(0)
	}
	return func(first uint64, n int, samples []int32, digital []uint64) {
		for i := 0; i < n; i++ {
			s := first + uint64(i)
			for c := 0; c < nch; c++ {
				samples[i*nch+c] = PatternValue(s, c)
			}
			digital[i] = PatternDigital(s) & mask
		}
	}
}

// PatternValue is the count of channel c at sample s in Pattern.
func PatternValue(s uint64, c int) int32 { return int32(int16(uint16(s*7919 + uint64(c)*257))) }

// PatternDigital is the digital word of sample s in Pattern.
func PatternDigital(s uint64) uint64 { return s*0x9E3779B97F4A7C15 ^ s>>3 }
