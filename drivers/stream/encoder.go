package stream

import (
	"encoding/binary"
	"fmt"
)

// Encoder writes the device side of the protocol: the ANNOUNCE frame and
// DATA frames in the announced layout. It is the reference for firmware:
// AppendData shows, byte by byte, what a DATA frame holds.
type Encoder struct {
	a      Announce
	layout Layout
}

// NewEncoder returns an encoder for a device that announces a.
func NewEncoder(a Announce) (*Encoder, error) {
	if a.Version == 0 {
		a.Version = Version
	}
	if err := a.Validate(); err != nil {
		return nil, fmt.Errorf("stream: announce: %w", err)
	}
	return &Encoder{a: a, layout: a.Layout()}, nil
}

// Announce returns what the encoder announces.
func (e *Encoder) Announce() Announce { return e.a }

// Layout returns the layout of the DATA frames.
func (e *Encoder) Layout() Layout { return e.layout }

// AppendAnnounce appends the ANNOUNCE frame.
func (e *Encoder) AppendAnnounce(dst []byte) []byte {
	var p [16 + 3*(1+MaxStringLen)]byte
	payload := e.a.AppendPayload(p[:0])
	return AppendFrame(dst, TypeAnnounce, payload)
}

// AppendData appends one DATA frame: first is the sample number of the
// first sample, samples holds n samples of Channels counts each,
// interleaved by sample (sample i, channel c at samples[i*Channels+c]),
// and digital the n digital words. Values must fit the format (int16,
// int24, int32) and digital words the announced width. It does not
// allocate when dst has room for the frame.
func (e *Encoder) AppendData(dst []byte, first uint64, samples []int32, digital []uint64) ([]byte, error) {
	l := e.layout
	if len(samples)%l.Channels != 0 {
		return dst, fmt.Errorf("stream: %d values are not a whole number of %d-channel samples", len(samples), l.Channels)
	}
	n := len(samples) / l.Channels
	if n < 1 || n > l.MaxSamples || len(digital) != n {
		return dst, fmt.Errorf("stream: a DATA frame holds 1–%d samples with one digital word each; got %d samples and %d words", l.MaxSamples, n, len(digital))
	}
	bits := l.Format.Bits()
	lo, hi := -int64(1)<<(bits-1), int64(1)<<(bits-1)-1
	var dmask uint64 = 1<<(8*l.DigitalBytes) - 1
	if l.DigitalBytes == 8 {
		dmask = ^uint64(0)
	}
	start := len(dst)
	payload := 8 + n*l.SampleBytes()
	dst = appendHeader(dst, TypeData, payload)
	dst = binary.LittleEndian.AppendUint64(dst, first)
	for i := 0; i < n; i++ {
		for _, v := range samples[i*l.Channels : (i+1)*l.Channels] {
			if int64(v) < lo || int64(v) > hi {
				return dst[:start], fmt.Errorf("stream: sample %d: value %d does not fit %v", i, v, l.Format)
			}
			switch l.Format {
			case Int16:
				dst = append(dst, byte(v), byte(v>>8))
			case Int24:
				dst = append(dst, byte(v), byte(v>>8), byte(v>>16))
			default:
				dst = append(dst, byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
			}
		}
		w := digital[i]
		if w&^dmask != 0 {
			return dst[:start], fmt.Errorf("stream: sample %d: digital word %#x is wider than %d bytes", i, w, l.DigitalBytes)
		}
		for k := 0; k < l.DigitalBytes; k++ {
			dst = append(dst, byte(w>>(8*k)))
		}
	}
	return binary.LittleEndian.AppendUint32(dst, CRC32C(dst[start:])), nil
}
