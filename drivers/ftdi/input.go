package ftdi

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/usb"
)

// InputConfig configures an Input: which chip and channel, and how to read
// its pins. It is not a registered source (the pipeline needs at least one
// continuous channel): the daemon merges the lines of an Input into a
// headstage's digital word.
type InputConfig struct {
	VID          int    `toml:"vid"`
	PID          int    `toml:"pid"`
	SerialNumber string `toml:"serial_number"`
	Interface    string `toml:"interface"`
	// Mode "pins" (default) polls the read-pins request every Period;
	// "sync" runs the chip in sync bitbang mode, clocking one sample per
	// byte written, and reads the samples from the bulk IN endpoint.
	Mode string `toml:"mode"`
	// Period between samples (pins mode) or between sample batches (sync
	// mode); default 1 ms.
	Period time.Duration `toml:"-"`
}

// DefaultInputConfig is an FT232H channel A polled every millisecond.
func DefaultInputConfig() InputConfig {
	return InputConfig{VID: 0x0403, PID: 0x6014, Interface: "A", Mode: "pins", Period: time.Millisecond}
}

// Input reads the eight pins of an FTDI channel as digital input lines
// 0–7. Open it, Start it, and call Lines from any goroutine.
type Input struct {
	chip   *Chip
	cfg    InputConfig
	stop   chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	word   uint64
	at     time.Time
	err    error
	closed bool

	// Sync mode: packets too short for their status bytes, and their bytes.
	malformed, discarded atomic.Uint64
}

// LinkStats reports the bytes of malformed bulk IN packets (too short to
// hold the two status bytes) in sync mode, each one a resync
// (drivers.LinkCounter). Sync bitbang data has no other framing to check.
func (in *Input) LinkStats() drivers.LinkStats {
	return drivers.LinkStats{DiscardedBytes: in.discarded.Load(), Resyncs: in.malformed.Load()}
}

// OpenInput opens the chip through opener (nil: USBOpener) with all pins
// as inputs.
func OpenInput(opener usb.Opener, cfg InputConfig) (*Input, error) {
	if opener == nil {
		opener = USBOpener
	}
	if cfg.Mode == "" {
		cfg.Mode = "pins"
	}
	if cfg.Mode != "pins" && cfg.Mode != "sync" {
		return nil, fmt.Errorf("input ftdi: mode %q: use \"pins\" or \"sync\"", cfg.Mode)
	}
	if cfg.Period <= 0 {
		cfg.Period = time.Millisecond
	}
	port, err := PortByLetter(cfg.Interface)
	if err != nil {
		return nil, fmt.Errorf("input ftdi: %v", err)
	}
	chip, err := OpenChip(opener, usb.ID{VID: uint16(cfg.VID), PID: uint16(cfg.PID), Serial: cfg.SerialNumber}, port)
	if err != nil {
		return nil, err
	}
	mode := byte(ModeAsyncBitbang)
	if cfg.Mode == "sync" {
		mode = ModeSyncBitbang
	}
	if err := chip.SetBitMode(mode, 0); err != nil {
		chip.Close()
		return nil, err
	}
	return &Input{chip: chip, cfg: cfg}, nil
}

// Start reads the pins once (so Lines is valid when it returns) and starts
// the reading goroutine.
func (in *Input) Start() error {
	w, err := in.chip.ReadPins()
	if err != nil {
		return err
	}
	in.set(uint64(w), time.Now())
	in.stop, in.done = make(chan struct{}), make(chan struct{})
	go in.run()
	return nil
}

func (in *Input) set(w uint64, at time.Time) {
	in.mu.Lock()
	in.word, in.at = w, at
	in.mu.Unlock()
}

// Lines returns the latest levels of the pins (bit n = pin n) and when
// they were read.
func (in *Input) Lines() (word uint64, at time.Time) {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.word, in.at
}

// Err is the error that stopped reading (the chip unplugged), or nil.
func (in *Input) Err() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.err
}

func (in *Input) run() {
	defer close(in.done)
	tick := time.NewTicker(in.cfg.Period)
	defer tick.Stop()
	var clock [64]byte // bytes written to clock samples in sync mode
	// A bulk IN transfer is read into whole max-size packets: a packet
	// that does not fit the buffer would overflow it (libusb refuses it).
	mps := in.chip.Dev.MaxPacketSize(in.chip.Port.In)
	if mps <= 2 {
		mps = 64
	}
	raw := make([]byte, 4*mps)
	data := make([]byte, 0, len(raw))
	for {
		select {
		case <-in.stop:
			return
		case <-tick.C:
		}
		var err error
		if in.cfg.Mode == "pins" {
			var w byte
			if w, err = in.chip.ReadPins(); err == nil {
				in.set(uint64(w), time.Now())
			}
		} else {
			if _, err = in.chip.Dev.Write(in.chip.Port.Out, clock[:], writeTimeout); err == nil {
				var n int
				n, err = in.chip.Dev.Read(in.chip.Port.In, raw, in.cfg.Period+writeTimeout)
				var bad, badBytes int
				data, bad, badBytes = SplitPackets(data[:0], raw[:n], mps)
				if bad > 0 {
					in.malformed.Add(uint64(bad))
					in.discarded.Add(uint64(badBytes))
				}
				if len(data) > 0 {
					in.set(uint64(data[len(data)-1]), time.Now())
				}
				if errors.Is(err, usb.ErrTimeout) {
					err = nil
				}
			}
			if err != nil {
				err = in.chip.fail("reading samples", err)
			}
		}
		if err != nil {
			in.mu.Lock()
			in.err = err
			in.mu.Unlock()
			return
		}
	}
}

// Close stops reading and closes the device.
func (in *Input) Close() error {
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		return nil
	}
	in.closed = true
	in.mu.Unlock()
	if in.stop != nil {
		close(in.stop)
		<-in.done
	}
	if in.Err() == nil {
		in.chip.SetBitMode(ModeReset, 0)
	}
	return in.chip.Close()
}

// StripModemStatus appends to dst the data bytes of a bulk IN transfer
// from an FTDI chip: every maxPacket-byte chunk of raw starts with two
// modem-status bytes, which are dropped.
func StripModemStatus(dst, raw []byte, maxPacket int) []byte {
	dst, _, _ = SplitPackets(dst, raw, maxPacket)
	return dst
}

// SplitPackets is StripModemStatus that also counts the malformed packets:
// chunks shorter than the two status bytes (a chip never sends one; only
// the last chunk of a transfer can be short), whose bytes are dropped.
func SplitPackets(dst, raw []byte, maxPacket int) (out []byte, malformed, malformedBytes int) {
	if maxPacket <= 2 {
		maxPacket = 64
	}
	for len(raw) > 0 {
		k := min(len(raw), maxPacket)
		switch {
		case k > 2:
			dst = append(dst, raw[2:k]...)
		case k < 2:
			malformed++
			malformedBytes += k
		}
		raw = raw[k:]
	}
	return dst, malformed, malformedBytes
}
