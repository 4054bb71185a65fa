package stream

import (
	"bytes"
	"encoding/binary"
)

// Frame is one frame found by the Decoder. Payload aliases the decoder's
// buffer: it is valid until the next call to Feed.
type Frame struct {
	Type    uint8
	Payload []byte
}

// DecoderStats counts what a Decoder has seen.
type DecoderStats struct {
	Frames    uint64 // frames with a good header and CRC
	BadFrames uint64 // frames with a good header whose CRC did not match
	// Discarded is the number of bytes that belonged to no good frame
	// (garbage, bad frames, bytes skipped while resynchronising).
	Discarded uint64
	// Resyncs is the number of stretches of discarded bytes between two
	// good frames: times the decoder lost the frame boundary and found it
	// again.
	Resyncs uint64
}

// Decoder finds frames in a byte stream. It does no I/O: Feed gives it
// bytes, Next returns the frames in them. It resynchronises after garbage
// by looking for the sync word, checking the header check and then the
// CRC; a candidate that fails either is skipped one byte at a time, so a
// frame hidden behind a false start is still found. Whatever way a stream
// is cut into Feed calls, the frames and counts are the same.
//
// A Decoder does not allocate after NewDecoder.
type Decoder struct {
	buf        []byte
	r, w       int
	maxPayload int
	stats      DecoderStats
	discarding bool // in a stretch of discarded bytes
}

var syncWord = []byte{Sync0, Sync1}

// NewDecoder returns a decoder that accepts payloads of up to maxPayload
// bytes (MaxPayload when 0 or larger).
func NewDecoder(maxPayload int) *Decoder {
	if maxPayload <= 0 || maxPayload > MaxPayload {
		maxPayload = MaxPayload
	}
	return &Decoder{buf: make([]byte, 2*(maxPayload+Overhead)), maxPayload: maxPayload}
}

// SetMaxPayload lowers the largest payload the decoder accepts (a header
// announcing more is taken for garbage); it cannot raise it above the
// value given to NewDecoder.
func (d *Decoder) SetMaxPayload(n int) {
	if n > 0 && n <= len(d.buf)/2-Overhead {
		d.maxPayload = n
	}
}

// Stats returns the counts so far.
func (d *Decoder) Stats() DecoderStats { return d.stats }

// Buffered is the number of bytes fed but not yet returned or discarded.
func (d *Decoder) Buffered() int { return d.w - d.r }

// Reset drops everything buffered (counting it as discarded).
func (d *Decoder) Reset() {
	d.discard(d.w - d.r)
	d.r, d.w = 0, 0
}

// Feed copies as much of p as the decoder can hold and returns how many
// bytes it took. After Next has reported that it has no more frames, Feed
// always takes at least one byte of a non-empty p. Feed invalidates the
// payloads of frames returned before.
func (d *Decoder) Feed(p []byte) int {
	if len(p) > len(d.buf)-d.w && d.r > 0 {
		d.w = copy(d.buf, d.buf[d.r:d.w])
		d.r = 0
	}
	n := copy(d.buf[d.w:], p)
	d.w += n
	return n
}

// Next returns the next good frame, or false when the bytes fed so far
// hold no complete frame.
func (d *Decoder) Next() (Frame, bool) {
	for {
		b := d.buf[d.r:d.w]
		if len(b) < 2 {
			if len(b) == 1 && b[0] != Sync0 {
				d.discard(1)
			}
			return Frame{}, false
		}
		if b[0] != Sync0 || b[1] != Sync1 {
			i := bytes.Index(b[1:], syncWord)
			if i < 0 {
				keep := 0
				if b[len(b)-1] == Sync0 {
					keep = 1
				}
				d.discard(len(b) - keep)
				return Frame{}, false
			}
			d.discard(i + 1)
			continue
		}
		if len(b) < HeaderSize {
			return Frame{}, false
		}
		n := int(binary.LittleEndian.Uint16(b[4:]))
		if n > d.maxPayload || binary.LittleEndian.Uint16(b[6:]) != headerCheck(b) {
			d.discard(1)
			continue
		}
		end := HeaderSize + n
		if len(b) < end+TrailerSize {
			return Frame{}, false
		}
		if CRC32C(b[:end]) != binary.LittleEndian.Uint32(b[end:]) {
			d.stats.BadFrames++
			d.discard(1)
			continue
		}
		d.r += end + TrailerSize
		d.stats.Frames++
		d.discarding = false
		return Frame{Type: b[2], Payload: b[HeaderSize:end:end]}, true
	}
}

func (d *Decoder) discard(n int) {
	d.r += n
	d.stats.Discarded += uint64(n)
	if !d.discarding && n > 0 {
		d.discarding = true
		d.stats.Resyncs++
	}
	if d.r == d.w {
		d.r, d.w = 0, 0
	}
}
