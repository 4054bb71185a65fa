// Package stream implements the ephysd stream protocol (docs/stream-protocol.md),
// an open framed protocol for custom high-rate headstages (Teensy, RP2040 and
// the like with an Intan-class ADC) over a CDC-ACM serial port or USB bulk
// endpoints.
//
// The package holds three things:
//
//   - the wire format: frame constants, the CRC, the handshake payloads
//     (Announce), and the data-frame layout (Layout, Data);
//
//   - a Decoder that finds frames in a byte stream (no I/O, resynchronises
//     after garbage, checks the CRCs, counts what it throws away) and an
//     Encoder that writes frames — the reference implementation firmware
//     authors can read as an executable specification;
//
//   - the source driver "stream", configured by the [source.stream] table:
//
//     [source.stream]
//     transport = "serial"      # or "usb"
//     path = "/dev/ttyACM0"     # serial
//     baud = 115200             # serial; CDC-ACM devices ignore it
//     vid = 0x1209              # usb (placeholder: the pid.codes test VID:PID)
//     pid = 0x0001
//     serial_number = ""        # usb, when several devices are attached
//     interface = 0             # usb
//     endpoint_in = 0x81        # usb
//     endpoint_out = 0x01       # usb
//     timeout_ms = 1000         # handshake answer and data stall limit
package stream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"unicode/utf8"
)

// Framing constants. Every frame, in both directions and in every protocol
// version, is
//
//	sync (EB 90) | type | reserved (00) | payload length (uint16 LE) |
//	header check (uint16 LE) | payload | CRC-32C (uint32 LE)
//
// The header check is the low 16 bits of the CRC-32C of the first six
// bytes; the CRC covers the header and the payload.
const (
	Sync0       = 0xEB
	Sync1       = 0x90
	HeaderSize  = 8
	TrailerSize = 4
	// Overhead is the framing bytes around a payload.
	Overhead = HeaderSize + TrailerSize
	// MaxPayload is the largest payload the length field can describe.
	MaxPayload = 0xFFFF
	// MaxFrame is the largest frame.
	MaxFrame = MaxPayload + Overhead
)

// Frame types. Host-to-device types have the high bit clear, device-to-host
// types have it set. Receivers ignore types they do not know.
const (
	TypeHello    = 0x01 // host: the protocol versions it speaks
	TypeStart    = 0x02 // host: start streaming
	TypeStop     = 0x03 // host: stop streaming
	TypeAnnounce = 0x81 // device: what it is and how its data frames look
	TypeData     = 0x82 // device: samples
	TypeLog      = 0x83 // device: a line of text for the log
	TypeError    = 0x84 // device: an error code and text
)

// Version is the protocol version this package speaks.
const Version = 1

// Versions lists every protocol version this package speaks, lowest first.
var Versions = []uint8{Version}

// Error codes of TypeError frames.
const (
	// ErrCodeVersion: none of the host's versions is spoken by the device.
	// The error's data lists the versions the device speaks.
	ErrCodeVersion = 0x01
	// ErrCodeOverrun: the device lost samples (its buffer overflowed); the
	// data frames show the gap in their sample numbers.
	ErrCodeOverrun = 0x02
	// ErrCodeCommand: the device could not carry out a command.
	ErrCodeCommand = 0x03
	// ErrCodeHardware: the acquisition hardware failed (ADC not answering);
	// the device stops streaming.
	ErrCodeHardware = 0x04
)

// Log levels of TypeLog frames.
const (
	LogDebug = 0
	LogInfo  = 1
	LogWarn  = 2
	LogError = 3
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// CRC32C is the protocol's checksum: CRC-32C (Castagnoli), polynomial
// 0x1EDC6F41 (reflected 0x82F63B78), initial value 0xFFFFFFFF, input and
// output reflected, final XOR 0xFFFFFFFF. CRC32C("123456789") = 0xE3069283.
func CRC32C(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// headerCheck is the header check of the first six header bytes.
func headerCheck(h []byte) uint16 { return uint16(crc32.Checksum(h[:6], castagnoli)) }

// AppendFrame appends one frame of type typ carrying payload to dst. It
// panics when the payload is longer than MaxPayload.
func AppendFrame(dst []byte, typ uint8, payload []byte) []byte {
	if len(payload) > MaxPayload {
		panic(fmt.Sprintf("stream: payload of %d bytes exceeds %d", len(payload), MaxPayload))
	}
	start := len(dst)
	dst = appendHeader(dst, typ, len(payload))
	dst = append(dst, payload...)
	return binary.LittleEndian.AppendUint32(dst, CRC32C(dst[start:]))
}

// appendHeader appends the eight header bytes of a frame with n payload
// bytes.
func appendHeader(dst []byte, typ uint8, n int) []byte {
	h := len(dst)
	dst = append(dst, Sync0, Sync1, typ, 0, byte(n), byte(n>>8), 0, 0)
	binary.LittleEndian.PutUint16(dst[h+6:], headerCheck(dst[h:]))
	return dst
}

// AppendHello appends a HELLO frame offering the given protocol versions
// (Versions when none are given).
func AppendHello(dst []byte, versions ...uint8) []byte {
	if len(versions) == 0 {
		versions = Versions
	}
	var p [256]byte
	p[0] = byte(len(versions))
	n := 1 + copy(p[1:], versions)
	return AppendFrame(dst, TypeHello, p[:n])
}

// AppendStart appends a START frame.
func AppendStart(dst []byte) []byte { return AppendFrame(dst, TypeStart, nil) }

// AppendStop appends a STOP frame.
func AppendStop(dst []byte) []byte { return AppendFrame(dst, TypeStop, nil) }

// AppendLog appends a LOG frame: level (LogDebug…LogError) and UTF-8 text.
func AppendLog(dst []byte, level uint8, text string) []byte {
	p := make([]byte, 0, 1+len(text))
	p = append(p, level)
	p = append(p, text...)
	return AppendFrame(dst, TypeLog, p)
}

// AppendError appends an ERROR frame: code, up to 255 bytes of data (for
// ErrCodeVersion the versions the device speaks), then UTF-8 text.
func AppendError(dst []byte, code uint8, data []byte, text string) []byte {
	if len(data) > 255 {
		data = data[:255]
	}
	p := make([]byte, 0, 2+len(data)+len(text))
	p = append(p, code, byte(len(data)))
	p = append(p, data...)
	p = append(p, text...)
	return AppendFrame(dst, TypeError, p)
}

// ParseHello returns the versions a HELLO payload offers.
func ParseHello(p []byte) ([]uint8, error) {
	if len(p) < 1 || int(p[0]) > len(p)-1 {
		return nil, errors.New("stream: HELLO payload too short")
	}
	return p[1 : 1+int(p[0])], nil
}

// DeviceError is an ERROR frame from the device.
type DeviceError struct {
	Code uint8
	Data []byte
	Text string
}

func (e *DeviceError) Error() string {
	name := map[uint8]string{ErrCodeVersion: "unsupported protocol version", ErrCodeOverrun: "overrun",
		ErrCodeCommand: "command failed", ErrCodeHardware: "hardware failure"}[e.Code]
	if name == "" {
		name = fmt.Sprintf("error 0x%02x", e.Code)
	}
	if e.Text != "" {
		return name + ": " + e.Text
	}
	return name
}

// ParseError decodes an ERROR payload.
func ParseError(p []byte) (*DeviceError, error) {
	if len(p) < 2 || len(p) < 2+int(p[1]) {
		return nil, errors.New("stream: ERROR payload too short")
	}
	n := int(p[1])
	return &DeviceError{Code: p[0], Data: p[2 : 2+n], Text: string(p[2+n:])}, nil
}

// Format is the encoding of one sample value of one channel:
// little-endian two's complement.
type Format uint8

// Sample formats.
const (
	Int16 Format = 1
	Int24 Format = 2
	Int32 Format = 3
)

// Size is the number of bytes of one value, 0 for an unknown format.
func (f Format) Size() int {
	switch f {
	case Int16:
		return 2
	case Int24:
		return 3
	case Int32:
		return 4
	}
	return 0
}

// Bits is the width of one value in bits.
func (f Format) Bits() int { return 8 * f.Size() }

func (f Format) String() string {
	switch f {
	case Int16:
		return "int16"
	case Int24:
		return "int24"
	case Int32:
		return "int32"
	}
	return fmt.Sprintf("format %d", uint8(f))
}

// Limits of announced values.
const (
	MaxChannels  = 4096
	MaxStringLen = 64
)

// Announce is the payload of the device's ANNOUNCE frame: what the device
// is and how its data frames look. Version 1 layout, little-endian:
//
//	0  uint8    version       the protocol version the device will speak
//	1  uint8    format        1 int16, 2 int24, 3 int32
//	2  uint8    digital_bytes 0, 1, 2, 4 or 8: the digital word per sample
//	3  uint8    flags         bit 0: a per-channel scale table follows
//	4  uint16   channels      1–4096
//	6  uint16   max_samples   most samples in one DATA frame
//	8  uint32   rate_mhz      sample rate in millihertz
//	12 float32  scale_uv      µV per count
//	16 uint8 + bytes  name, serial, firmware (each ≤ 64 bytes UTF-8)
//	   float32 × channels    per-channel µV per count, when flags bit 0
type Announce struct {
	Version      uint8
	Format       Format
	DigitalBytes int
	Channels     int
	MaxSamples   int
	RateMilliHz  uint32
	ScaleUV      float32
	// ChannelScaleUV, when not empty, gives each channel its own µV per
	// count (and ScaleUV is then only informative).
	ChannelScaleUV []float32
	Name           string
	Serial         string
	Firmware       string
}

// Rate is the sample rate in Hz.
func (a Announce) Rate() float64 { return float64(a.RateMilliHz) / 1000 }

// Layout is the shape of the announced data frames.
func (a Announce) Layout() Layout {
	return Layout{Channels: a.Channels, Format: a.Format, DigitalBytes: a.DigitalBytes, MaxSamples: a.MaxSamples}
}

// Scale returns the µV per count of channel c.
func (a Announce) Scale(c int) float32 {
	if len(a.ChannelScaleUV) > 0 {
		return a.ChannelScaleUV[c]
	}
	return a.ScaleUV
}

// Validate checks every field against the protocol's limits.
func (a *Announce) Validate() error {
	if a.Format.Size() == 0 {
		return fmt.Errorf("sample format %d is not one of 1 (int16), 2 (int24), 3 (int32)", uint8(a.Format))
	}
	switch a.DigitalBytes {
	case 0, 1, 2, 4, 8:
	default:
		return fmt.Errorf("digital word of %d bytes: must be 0, 1, 2, 4 or 8", a.DigitalBytes)
	}
	if a.Channels < 1 || a.Channels > MaxChannels {
		return fmt.Errorf("%d channels: must be 1–%d", a.Channels, MaxChannels)
	}
	if a.MaxSamples < 1 {
		return fmt.Errorf("max_samples = %d: must be at least 1", a.MaxSamples)
	}
	if l := a.Layout(); l.MaxFrame() > MaxFrame {
		return fmt.Errorf("a frame of %d samples × %d bytes is %d bytes, more than the %d a frame can hold: announce fewer max_samples", a.MaxSamples, l.SampleBytes(), l.MaxFrame(), MaxFrame)
	}
	if a.RateMilliHz == 0 {
		return errors.New("sample rate 0")
	}
	if !(a.ScaleUV > 0) || math.IsInf(float64(a.ScaleUV), 0) {
		return fmt.Errorf("scale %g µV per count: must be positive", a.ScaleUV)
	}
	if len(a.ChannelScaleUV) != 0 {
		if len(a.ChannelScaleUV) != a.Channels {
			return fmt.Errorf("%d per-channel scales for %d channels", len(a.ChannelScaleUV), a.Channels)
		}
		for c, s := range a.ChannelScaleUV {
			if !(s > 0) || math.IsInf(float64(s), 0) {
				return fmt.Errorf("channel %d: scale %g µV per count: must be positive", c+1, s)
			}
		}
	}
	for _, s := range []struct{ what, v string }{{"name", a.Name}, {"serial", a.Serial}, {"firmware", a.Firmware}} {
		if len(s.v) > MaxStringLen || !utf8.ValidString(s.v) {
			return fmt.Errorf("%s %q: must be valid UTF-8 of at most %d bytes", s.what, s.v, MaxStringLen)
		}
	}
	return nil
}

// AppendPayload appends the version-1 ANNOUNCE payload.
func (a *Announce) AppendPayload(dst []byte) []byte {
	var flags byte
	if len(a.ChannelScaleUV) > 0 {
		flags |= 1
	}
	dst = append(dst, a.Version, byte(a.Format), byte(a.DigitalBytes), flags)
	dst = binary.LittleEndian.AppendUint16(dst, uint16(a.Channels))
	dst = binary.LittleEndian.AppendUint16(dst, uint16(a.MaxSamples))
	dst = binary.LittleEndian.AppendUint32(dst, a.RateMilliHz)
	dst = binary.LittleEndian.AppendUint32(dst, math.Float32bits(a.ScaleUV))
	for _, s := range []string{a.Name, a.Serial, a.Firmware} {
		if len(s) > MaxStringLen {
			s = s[:MaxStringLen]
		}
		dst = append(dst, byte(len(s)))
		dst = append(dst, s...)
	}
	for _, s := range a.ChannelScaleUV {
		dst = binary.LittleEndian.AppendUint32(dst, math.Float32bits(s))
	}
	return dst
}

// ParseAnnounce decodes and validates an ANNOUNCE payload. Only the
// version byte is read when the version is not one this package speaks
// (the returned Announce then has just Version set, with the error).
// Bytes after the known fields are ignored.
func ParseAnnounce(p []byte) (Announce, error) {
	var a Announce
	if len(p) < 1 {
		return a, errors.New("empty ANNOUNCE")
	}
	a.Version = p[0]
	if !speaks(a.Version) {
		return a, &VersionError{Device: []uint8{a.Version}}
	}
	if len(p) < 16 {
		return a, fmt.Errorf("ANNOUNCE of %d bytes is too short (at least 19)", len(p))
	}
	a.Format = Format(p[1])
	a.DigitalBytes = int(p[2])
	flags := p[3]
	a.Channels = int(binary.LittleEndian.Uint16(p[4:]))
	a.MaxSamples = int(binary.LittleEndian.Uint16(p[6:]))
	a.RateMilliHz = binary.LittleEndian.Uint32(p[8:])
	a.ScaleUV = math.Float32frombits(binary.LittleEndian.Uint32(p[12:]))
	rest := p[16:]
	for _, s := range []*string{&a.Name, &a.Serial, &a.Firmware} {
		if len(rest) < 1 || len(rest) < 1+int(rest[0]) {
			return a, errors.New("ANNOUNCE ends inside the name, serial or firmware string")
		}
		*s = string(rest[1 : 1+int(rest[0])])
		rest = rest[1+int(rest[0]):]
	}
	if flags&1 != 0 {
		if a.Channels > MaxChannels || len(rest) < 4*a.Channels {
			return a, errors.New("ANNOUNCE ends inside the per-channel scale table")
		}
		a.ChannelScaleUV = make([]float32, a.Channels)
		for c := range a.ChannelScaleUV {
			a.ChannelScaleUV[c] = math.Float32frombits(binary.LittleEndian.Uint32(rest[4*c:]))
		}
	}
	if err := a.Validate(); err != nil {
		return a, err
	}
	return a, nil
}

func speaks(v uint8) bool {
	for _, w := range Versions {
		if v == w {
			return true
		}
	}
	return false
}

// VersionError is a device that speaks none of our protocol versions.
type VersionError struct {
	Device []uint8 // the versions the device speaks (or announced)
}

func (e *VersionError) Error() string {
	return fmt.Sprintf("the device speaks protocol version %s, ephysd speaks %s — update the firmware or ephysd so they share a version", versionList(e.Device), versionList(Versions))
}

func versionList(v []uint8) string {
	if len(v) == 0 {
		return "(none)"
	}
	s := ""
	for i, x := range v {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprint(x)
	}
	return s
}

// Layout is the shape of DATA frames: the payload is the sample number of
// the first sample (uint64 LE), then samples one after the other, each
// holding Channels values of Format followed by a DigitalBytes-wide
// little-endian digital word.
type Layout struct {
	Channels     int
	Format       Format
	DigitalBytes int
	MaxSamples   int
}

// SampleBytes is the size of one sample (all channels and the digital
// word).
func (l Layout) SampleBytes() int { return l.Channels*l.Format.Size() + l.DigitalBytes }

// MaxFrame is the size of the largest DATA frame, framing included.
func (l Layout) MaxFrame() int { return Overhead + 8 + l.MaxSamples*l.SampleBytes() }

// MaxPayload is the payload size of the largest DATA frame.
func (l Layout) MaxPayload() int { return 8 + l.MaxSamples*l.SampleBytes() }

// Data is one decoded DATA frame. It aliases the frame's payload.
type Data struct {
	First   uint64 // sample number of the first sample
	Samples int    // samples in the frame
	raw     []byte // the samples
	layout  Layout
}

// ErrMalformed is a DATA frame whose length does not match the announced
// layout.
var ErrMalformed = errors.New("stream: DATA frame length does not fit the announced layout")

// Data decodes a DATA payload.
func (l Layout) Data(payload []byte) (Data, error) {
	sb := l.SampleBytes()
	if len(payload) < 8+sb || sb <= 0 || (len(payload)-8)%sb != 0 {
		return Data{}, ErrMalformed
	}
	n := (len(payload) - 8) / sb
	if n > l.MaxSamples {
		return Data{}, ErrMalformed
	}
	return Data{First: binary.LittleEndian.Uint64(payload), Samples: n, raw: payload[8:], layout: l}, nil
}

// Value returns channel c of sample i, in counts.
func (d Data) Value(i, c int) int32 {
	sz := d.layout.Format.Size()
	p := d.raw[i*d.layout.SampleBytes()+c*sz:]
	switch d.layout.Format {
	case Int16:
		return int32(int16(binary.LittleEndian.Uint16(p)))
	case Int24:
		return int32(uint32(p[0])|uint32(p[1])<<8|uint32(p[2])<<16) << 8 >> 8
	default:
		return int32(binary.LittleEndian.Uint32(p))
	}
}

// Digital returns the digital word of sample i.
func (d Data) Digital(i int) uint64 {
	l := d.layout
	p := d.raw[i*l.SampleBytes()+l.Channels*l.Format.Size():]
	switch l.DigitalBytes {
	case 1:
		return uint64(p[0])
	case 2:
		return uint64(binary.LittleEndian.Uint16(p))
	case 4:
		return uint64(binary.LittleEndian.Uint32(p))
	case 8:
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

// Scale writes samples from..from+n-1 as µV into dst, channel-major with
// the given stride (channel c of sample from+k at dst[c*stride+at+k]), and
// their digital words into digital[at:at+n]. scale holds µV per count per
// channel. It does not allocate.
func (d Data) Scale(from, n int, dst []float32, stride, at int, scale []float32, digital []uint64) {
	l := d.layout
	sb := l.SampleBytes()
	nch := l.Channels
	scale = scale[:nch]
	digital = digital[at : at+n]
	for k := 0; k < n; k++ {
		p := d.raw[(from+k)*sb : (from+k+1)*sb]
		o := at + k
		switch l.Format {
		case Int16:
			v := p[:2*nch]
			for c, s := range scale {
				dst[c*stride+o] = float32(int16(uint16(v[2*c])|uint16(v[2*c+1])<<8)) * s
			}
		case Int24:
			v := p[:3*nch]
			for c, s := range scale {
				x := int32(uint32(v[3*c])|uint32(v[3*c+1])<<8|uint32(v[3*c+2])<<16) << 8 >> 8
				dst[c*stride+o] = float32(x) * s
			}
		default:
			v := p[:4*nch]
			for c, s := range scale {
				dst[c*stride+o] = float32(int32(binary.LittleEndian.Uint32(v[4*c:]))) * s
			}
		}
		w := p[nch*l.Format.Size():]
		switch l.DigitalBytes {
		case 0:
			digital[k] = 0
		case 1:
			digital[k] = uint64(w[0])
		case 2:
			digital[k] = uint64(binary.LittleEndian.Uint16(w))
		case 4:
			digital[k] = uint64(binary.LittleEndian.Uint32(w))
		case 8:
			digital[k] = binary.LittleEndian.Uint64(w)
		}
	}
}
