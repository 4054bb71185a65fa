package stream

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
)

// The worked examples of docs/stream-protocol.md.
const (
	docHello    = "eb 90 01 00 02 00 26 7b 01 01 a8 4b 00 93"
	docStart    = "eb 90 02 00 00 00 f1 c2 5d bd 61 f1"
	docStop     = "eb 90 03 00 00 00 49 68 18 60 61 f1"
	docAnnounce = "eb 90 81 00 26 00 c7 30 01 01 02 00 04 00 02 00 80 c3 c9 01 14 ae 47 3e 0c 54 34 20 68 65 61 64 73 74 61 67 65 04 30 30 34 32 03 31 2e 30 43 e9 d0 67"
	docData     = "eb 90 82 00 1c 00 2b 58 00 01 00 00 00 00 00 00 64 00 9c ff 01 00 ff ff 01 00 ff 7f 00 80 00 00 02 00 00 80 89 65 97 3f"
	docError    = "eb 90 84 00 0a 00 ea ea 01 01 02 6e 65 65 64 20 76 32 f1 3b 79 1a"
	docLog      = "eb 90 83 00 07 00 33 68 01 41 44 43 20 6f 6b 67 e8 fe ec"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func docAnnounceValue() Announce {
	return Announce{Version: 1, Format: Int16, DigitalBytes: 2, Channels: 4, MaxSamples: 2, RateMilliHz: 30000000,
		ScaleUV: 0.195, Name: "T4 headstage", Serial: "0042", Firmware: "1.0"}
}

func TestCRC32CTestVector(t *testing.T) {
	if got := CRC32C([]byte("123456789")); got != 0xE3069283 {
		t.Fatalf("CRC32C(\"123456789\") = %#08x, want 0xe3069283", got)
	}
	if got := CRC32C(nil); got != 0 {
		t.Fatalf("CRC32C(empty) = %#x, want 0", got)
	}
}

func TestDocumentedFrames(t *testing.T) {
	e, err := NewEncoder(docAnnounceValue())
	if err != nil {
		t.Fatal(err)
	}
	data, err := e.AppendData(nil, 256, []int32{100, -100, 1, -1, 32767, -32768, 0, 2}, []uint64{1, 0x8000})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		got  []byte
		want string
	}{
		{"HELLO", AppendHello(nil), docHello},
		{"START", AppendStart(nil), docStart},
		{"STOP", AppendStop(nil), docStop},
		{"ANNOUNCE", e.AppendAnnounce(nil), docAnnounce},
		{"DATA", data, docData},
		{"ERROR", AppendError(nil, ErrCodeVersion, []byte{2}, "need v2"), docError},
		{"LOG", AppendLog(nil, LogInfo, "ADC ok"), docLog},
	} {
		if !bytes.Equal(c.got, unhex(t, c.want)) {
			t.Errorf("%s = % x\nwant      %s", c.name, c.got, c.want)
		}
	}

	// And they decode to what they say.
	d := NewDecoder(0)
	for _, s := range []string{docAnnounce, docData} {
		d.Feed(unhex(t, s))
	}
	f, ok := d.Next()
	if !ok || f.Type != TypeAnnounce {
		t.Fatalf("ANNOUNCE not decoded: %v %v", f, ok)
	}
	a, err := ParseAnnounce(f.Payload)
	if err != nil || a.Name != "T4 headstage" || a.Rate() != 30000 || a.Channels != 4 || a.ScaleUV != float32(0.195) {
		t.Fatalf("ANNOUNCE = %+v, %v", a, err)
	}
	f, ok = d.Next()
	if !ok || f.Type != TypeData {
		t.Fatal("DATA not decoded")
	}
	dd, err := a.Layout().Data(f.Payload)
	if err != nil || dd.First != 256 || dd.Samples != 2 || dd.Value(0, 1) != -100 || dd.Value(1, 1) != -32768 || dd.Digital(1) != 0x8000 {
		t.Fatalf("DATA = %+v, %v", dd, err)
	}
	e2, err := ParseError(unhex(t, docError)[HeaderSize : len(unhex(t, docError))-TrailerSize])
	if err != nil || e2.Code != ErrCodeVersion || !bytes.Equal(e2.Data, []byte{2}) || e2.Text != "need v2" {
		t.Fatalf("ERROR = %+v, %v", e2, err)
	}
}

func TestAnnounceRoundTrip(t *testing.T) {
	a := docAnnounceValue()
	a.ChannelScaleUV = []float32{0.1, 0.2, 0.3, 0.4}
	a.Format = Int24
	a.DigitalBytes = 8
	got, err := ParseAnnounce(a.AppendPayload(nil))
	if err != nil {
		t.Fatal(err)
	}
	if got.Scale(2) != 0.3 || got.Format != Int24 || got.DigitalBytes != 8 || got.Serial != "0042" || got.Firmware != "1.0" {
		t.Fatalf("round trip = %+v", got)
	}
	// Trailing bytes (a later minor extension) are ignored.
	if _, err := ParseAnnounce(append(a.AppendPayload(nil), 1, 2, 3)); err != nil {
		t.Fatal(err)
	}
	// An unknown version is reported as such.
	a.Version = 7
	_, err = ParseAnnounce(a.AppendPayload(nil))
	var ve *VersionError
	if !errors.As(err, &ve) || !strings.Contains(err.Error(), "version 7, ephysd speaks 1") {
		t.Fatalf("version 7: %v", err)
	}
	for _, bad := range []func(*Announce){
		func(a *Announce) { a.Format = 9 },
		func(a *Announce) { a.DigitalBytes = 3 },
		func(a *Announce) { a.Channels = 0 },
		func(a *Announce) { a.MaxSamples = 0 },
		func(a *Announce) { a.Channels, a.MaxSamples = 4096, 100 },
		func(a *Announce) { a.RateMilliHz = 0 },
		func(a *Announce) { a.ScaleUV = -1 },
	} {
		a := docAnnounceValue()
		bad(&a)
		if _, err := ParseAnnounce(a.AppendPayload(nil)); err == nil {
			t.Errorf("announce %+v accepted", a)
		}
	}
}

// randomShape is a random valid layout and the values of one frame.
func randomShape(r *rand.Rand) Announce {
	a := Announce{Version: 1, Format: Format(1 + r.IntN(3)), DigitalBytes: []int{0, 1, 2, 4, 8}[r.IntN(5)],
		Channels: 1 + r.IntN(80), MaxSamples: 1 + r.IntN(40), RateMilliHz: 1 + r.Uint32(), ScaleUV: 0.01 + r.Float32()}
	if r.IntN(4) == 0 {
		a.Channels = 1 + r.IntN(1024)
		a.MaxSamples = 1 + r.IntN(8)
	}
	return a
}

func randomFrame(r *rand.Rand, a Announce) (first uint64, n int, samples []int32, digital []uint64) {
	n = 1 + r.IntN(a.MaxSamples)
	bits := a.Format.Bits()
	samples = make([]int32, n*a.Channels)
	for i := range samples {
		samples[i] = int32(r.Uint32()) << (32 - bits) >> (32 - bits)
	}
	digital = make([]uint64, n)
	for i := range digital {
		if a.DigitalBytes > 0 {
			digital[i] = r.Uint64() >> (64 - 8*a.DigitalBytes)
		}
	}
	return r.Uint64(), n, samples, digital
}

// TestRoundTripRandomShapes encodes random frames of random layouts, cuts
// the stream at random places and checks every value and word.
func TestRoundTripRandomShapes(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for trial := 0; trial < 200; trial++ {
		a := randomShape(r)
		e, err := NewEncoder(a)
		if err != nil {
			t.Fatalf("%+v: %v", a, err)
		}
		type frame struct {
			first   uint64
			n       int
			samples []int32
			digital []uint64
		}
		var want []frame
		var wire []byte
		for k := 0; k < 1+r.IntN(6); k++ {
			first, n, samples, digital := randomFrame(r, a)
			if wire, err = e.AppendData(wire, first, samples, digital); err != nil {
				t.Fatal(err)
			}
			want = append(want, frame{first, n, samples, digital})
		}
		d := NewDecoder(0)
		d.SetMaxPayload(a.Layout().MaxPayload())
		got := 0
		scale := make([]float32, a.Channels)
		for c := range scale {
			scale[c] = 1
		}
		for len(wire) > 0 {
			cut := min(len(wire), 1+r.IntN(5000))
			for p := wire[:cut]; len(p) > 0; {
				p = p[d.Feed(p):]
				for {
					f, ok := d.Next()
					if !ok {
						break
					}
					dd, err := a.Layout().Data(f.Payload)
					if err != nil {
						t.Fatal(err)
					}
					w := want[got]
					if dd.First != w.first || dd.Samples != w.n {
						t.Fatalf("frame %d: first %d n %d, want %d %d", got, dd.First, dd.Samples, w.first, w.n)
					}
					fl := make([]float32, a.Channels*w.n)
					dg := make([]uint64, w.n)
					dd.Scale(0, w.n, fl, w.n, 0, scale, dg)
					for i := 0; i < w.n; i++ {
						for c := 0; c < a.Channels; c++ {
							if v := dd.Value(i, c); v != w.samples[i*a.Channels+c] || fl[c*w.n+i] != float32(v) {
								t.Fatalf("%+v frame %d sample %d ch %d: %d (%g), want %d", a, got, i, c, v, fl[c*w.n+i], w.samples[i*a.Channels+c])
							}
						}
						if dd.Digital(i) != w.digital[i] || dg[i] != w.digital[i] {
							t.Fatalf("frame %d sample %d: digital %#x, want %#x", got, i, dd.Digital(i), w.digital[i])
						}
					}
					got++
				}
			}
			wire = wire[cut:]
		}
		if got != len(want) || d.Stats().Discarded != 0 || d.Stats().BadFrames != 0 {
			t.Fatalf("%d of %d frames, stats %+v", got, len(want), d.Stats())
		}
	}
}

func TestEncoderRejects(t *testing.T) {
	e, _ := NewEncoder(docAnnounceValue())
	if _, err := e.AppendData(nil, 0, []int32{1, 2, 3, 40000}, []uint64{0}); err == nil {
		t.Error("40000 accepted as int16")
	}
	if _, err := e.AppendData(nil, 0, []int32{1, 2, 3, 4}, []uint64{0x10000}); err == nil {
		t.Error("a 17-bit word accepted as 2 bytes")
	}
	if _, err := e.AppendData(nil, 0, make([]int32, 12), make([]uint64, 3)); err == nil {
		t.Error("3 samples accepted with max_samples 2")
	}
}

// TestResyncAfterGarbage puts garbage (including false sync words and a
// header that passes its check) before, between and inside frames.
func TestResyncAfterGarbage(t *testing.T) {
	e, _ := NewEncoder(docAnnounceValue())
	frame := func(first uint64) []byte {
		b, _ := e.AppendData(nil, first, []int32{1, 2, 3, 4, 5, 6, 7, 8}, []uint64{9, 10})
		return b
	}
	falseHeader := appendHeader(nil, TypeData, 28) // a good header with nothing behind it
	var wire []byte
	wire = append(wire, 0xEB, 0xEB, 0x90, 0x00, 0x11, 0xEB)
	wire = append(wire, frame(0)...)
	wire = append(wire, falseHeader...)
	wire = append(wire, frame(2)...)
	bad := frame(4)
	bad[20] ^= 0x40
	wire = append(wire, bad...)
	wire = append(wire, frame(6)[:17]...) // truncated
	wire = append(wire, frame(8)...)
	wire = append(wire, 0xEB)

	d := NewDecoder(0)
	var firsts []uint64
	d.Feed(wire)
	for {
		f, ok := d.Next()
		if !ok {
			break
		}
		dd, err := docAnnounceValue().Layout().Data(f.Payload)
		if err != nil {
			t.Fatal(err)
		}
		firsts = append(firsts, dd.First)
	}
	if len(firsts) != 3 || firsts[0] != 0 || firsts[1] != 2 || firsts[2] != 8 {
		t.Fatalf("frames at %v, want [0 2 8]", firsts)
	}
	st := d.Stats()
	wantDiscarded := uint64(6 + len(falseHeader) + len(bad) + 17)
	if st.Frames != 3 || st.BadFrames < 1 || st.Discarded != wantDiscarded || d.Buffered() != 1 {
		t.Fatalf("stats %+v buffered %d, want 3 frames, ≥1 bad, %d discarded, 1 buffered", st, d.Buffered(), wantDiscarded)
	}
}
