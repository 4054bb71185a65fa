package stream_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/drivers/stream"
	"github.com/ephysd/ephysd/drivers/stream/streamdev"
	"github.com/ephysd/ephysd/drivers/usb"
	"github.com/ephysd/ephysd/pipeline"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func newBlock(t testing.TB, channels, samples int) *pipeline.Block {
	t.Helper()
	p, err := pipeline.NewPool(1, channels, samples)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close(false) })
	return p.TryGet()
}

// newDevice makes an emulated device, closed at the end of the test.
func newDevice(t testing.TB, cfg streamdev.Config) *streamdev.Device {
	t.Helper()
	d, err := streamdev.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

// patternDevice is a fast 64-channel device with the exact-value pattern.
func patternDevice(t testing.TB, cfg streamdev.Config) *streamdev.Device {
	t.Helper()
	a := streamdev.DefaultAnnounce()
	if cfg.Announce.Channels != 0 {
		a = cfg.Announce
	}
	cfg.Generate = streamdev.Pattern(a)
	return newDevice(t, cfg)
}

// onPTY serves d on a real pseudo-terminal and returns the configuration
// that opens its slave through serialport.
func onPTY(t testing.TB, d *streamdev.Device) *stream.Config {
	t.Helper()
	p := ptytest.New(t)
	if err := d.Go(p.Master); err != nil {
		t.Fatal(err)
	}
	cfg := stream.DefaultConfig()
	cfg.Path = p.Path
	cfg.TimeoutMS = 2000
	return &cfg
}

// onUSB configures the "usb" transport with d's fake opener.
func onUSB(t testing.TB, d *streamdev.Device) *stream.Config {
	cfg := stream.DefaultConfig()
	cfg.Transport = "usb"
	cfg.Opener = d.Opener()
	cfg.TimeoutMS = 2000
	return &cfg
}

func open(t testing.TB, cfg *stream.Config) *stream.Source {
	t.Helper()
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	s := src.(*stream.Source)
	t.Cleanup(func() { s.Close() })
	return s
}

var transports = []struct {
	name string
	cfg  func(testing.TB, *streamdev.Device) *stream.Config
}{{"pty", onPTY}, {"usb", onUSB}}

// checkPattern reads total samples in blocks of blockCap and checks every
// value and digital word against the pattern; it returns the blocks'
// first samples and lengths.
func checkPattern(t *testing.T, s *stream.Source, blockCap, total int) (firsts []int64, lens []int) {
	t.Helper()
	a := s.Announce()
	b := newBlock(t, a.Channels, blockCap)
	mask := uint64(1)<<(8*a.DigitalBytes) - 1
	for got := 0; got < total; {
		b.Reset()
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		firsts = append(firsts, b.FirstSample)
		lens = append(lens, b.Samples)
		for i := 0; i < b.Samples; i++ {
			sn := uint64(b.FirstSample) + uint64(i)
			for c := 0; c < a.Channels; c++ {
				want := float32(streamdev.PatternValue(sn, c)) * a.Scale(c)
				if got := b.Data[c*b.Samples+i]; got != want {
					t.Fatalf("sample %d channel %d = %g, want %g", sn, c, got, want)
				}
			}
			if want := streamdev.PatternDigital(sn) & mask; b.Digital[i] != want {
				t.Fatalf("sample %d digital = %#x, want %#x", sn, b.Digital[i], want)
			}
		}
		got += b.Samples
	}
	return firsts, lens
}

func TestRegistered(t *testing.T) {
	c, err := drivers.NewSourceConfig("stream")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.(*stream.Config)
	if cfg.Transport != "serial" || cfg.VID != 0x1209 || cfg.PID != 0x0001 || cfg.EndpointIn != 0x81 || cfg.EndpointOut != 0x01 || cfg.TimeoutMS != 1000 {
		t.Fatalf("defaults %+v", cfg)
	}
	for _, bad := range []func(*stream.Config){
		func(c *stream.Config) { c.Transport = "tcp" },
		func(c *stream.Config) { c.Path = "" },
		func(c *stream.Config) { c.Transport, c.EndpointIn = "usb", 0x01 },
		func(c *stream.Config) { c.Transport, c.EndpointOut = "usb", 0x81 },
		func(c *stream.Config) { c.Transport, c.VID = "usb", 0x10000 },
		func(c *stream.Config) { c.TimeoutMS = 0 },
	} {
		c := stream.DefaultConfig()
		bad(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}

// TestHandshakeBytes plays the device by hand on the pty master: the host's
// HELLO, START and STOP are byte for byte those of the documentation, and
// the documented ANNOUNCE and DATA frames decode to exact values.
func TestHandshakeBytes(t *testing.T) {
	p := ptytest.New(t)
	cfg := stream.DefaultConfig()
	cfg.Path = p.Path
	type result struct {
		src drivers.Source
		err error
	}
	done := make(chan result, 1)
	go func() { src, err := cfg.Open(); done <- result{src, err} }()

	hello := "eb 90 01 00 02 00 26 7b 01 01 a8 4b 00 93"
	if got := p.ReadFull(t, 14, 2*time.Second); !bytes.Equal(got, unhex(t, hello)) {
		t.Fatalf("HELLO = % x, want %s", got, hello)
	}
	// A stale DATA frame before the ANNOUNCE is ignored.
	data := unhex(t, "eb 90 82 00 1c 00 2b 58 00 01 00 00 00 00 00 00 64 00 9c ff 01 00 ff ff 01 00 ff 7f 00 80 00 00 02 00 00 80 89 65 97 3f")
	p.Master.Write(data)
	p.Master.Write(unhex(t, "eb 90 81 00 26 00 c7 30 01 01 02 00 04 00 02 00 80 c3 c9 01 14 ae 47 3e 0c 54 34 20 68 65 61 64 73 74 61 67 65 04 30 30 34 32 03 31 2e 30 43 e9 d0 67"))
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	s := r.src.(*stream.Source)
	defer s.Close()
	info := s.Info()
	if info.ProcessorName != "T4 headstage" || info.ProcessorID != 100 || info.StreamName != "stream" || info.SampleRate != 30000 ||
		len(info.Channels) != 4 || info.Channels[3].Name != "CH4" || info.Channels[0].Units != "uV" ||
		info.Channels[0].BitVolts != float64(float32(0.195)) || info.TTLLines != 16 {
		t.Fatalf("Info = %+v", info)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	if got := p.ReadFull(t, 12, 2*time.Second); !bytes.Equal(got, unhex(t, "eb 90 02 00 00 00 f1 c2 5d bd 61 f1")) {
		t.Fatalf("START = % x", got)
	}
	p.Master.Write(data)
	b := newBlock(t, 4, 2)
	if err := s.ReadBlock(b); err != nil {
		t.Fatal(err)
	}
	sc := float32(0.195)
	want := []float32{100 * sc, 32767 * sc, -100 * sc, -32768 * sc, 1 * sc, 0, -1 * sc, 2 * sc}
	if b.FirstSample != 256 || b.Samples != 2 || !equalF(b.Data[:8], want) || b.Digital[0] != 1 || b.Digital[1] != 0x8000 {
		t.Fatalf("block first %d n %d data %v digital %v", b.FirstSample, b.Samples, b.Data, b.Digital)
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if got := p.ReadFull(t, 12, 2*time.Second); !bytes.Equal(got, unhex(t, "eb 90 03 00 00 00 49 68 18 60 61 f1")) {
		t.Fatalf("STOP = % x", got)
	}
	if err := s.ReadBlock(b); err != io.EOF {
		t.Fatalf("ReadBlock after Stop = %v, want io.EOF", err)
	}
}

func equalF(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestEverySample streams the pattern and checks every value and digital
// word, with blocks that do not line up with frames.
func TestEverySample(t *testing.T) {
	for _, tr := range transports {
		for _, mps := range []int{512, 64} {
			if tr.name == "pty" && mps == 64 {
				continue
			}
			t.Run(tr.name, func(t *testing.T) {
				d := patternDevice(t, streamdev.Config{MaxPacketSize: mps})
				s := open(t, tr.cfg(t, d))
				if err := s.Start(); err != nil {
					t.Fatal(err)
				}
				firsts, lens := checkPattern(t, s, 100, 30000)
				for i := range firsts {
					if firsts[i] != int64(100*i) || lens[i] != 100 {
						t.Fatalf("block %d at %d of %d samples", i, firsts[i], lens[i])
					}
				}
				if st := s.Stats(); st.Gaps != 0 || st.BadFrames != 0 || st.DiscardedBytes != 0 {
					t.Fatalf("stats %+v", st)
				}
			})
		}
	}
}

// TestFormats runs int24 and int32 devices with per-channel scales and
// 1- and 8-byte digital words over USB.
func TestFormats(t *testing.T) {
	for _, a := range []stream.Announce{
		{Format: stream.Int24, DigitalBytes: 1, Channels: 3, MaxSamples: 7, RateMilliHz: 1000000, ScaleUV: 0.02, ChannelScaleUV: []float32{0.5, 0.25, 0.125}},
		{Format: stream.Int32, DigitalBytes: 8, Channels: 5, MaxSamples: 50, RateMilliHz: 20000000, ScaleUV: 0.001},
	} {
		d := patternDevice(t, streamdev.Config{Announce: a})
		s := open(t, onUSB(t, d))
		s.Start()
		checkPattern(t, s, 64, 1000)
		if bv := s.Info().Channels[0].BitVolts; bv != stream.BitVolts(a.Format, a.Scale(0)) || bv <= float64(a.Scale(0)) {
			t.Fatalf("bit_volts %g", bv)
		}
	}
}

// TestCorruptAndDroppedFrames: a frame with a bad CRC and a lost frame are
// exact gaps, counted, never filled.
func TestCorruptAndDroppedFrames(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			d := patternDevice(t, streamdev.Config{Faults: []streamdev.Fault{
				{Frame: 5, Kind: streamdev.CorruptCRC}, // samples 150–179
				{Frame: 9, Kind: streamdev.Drop},       // samples 270–299
			}})
			s := open(t, tr.cfg(t, d))
			s.Start()
			firsts, lens := checkPattern(t, s, 100, 600)
			wantFirsts := []int64{0, 100, 180, 300, 400, 500}
			wantLens := []int{100, 50, 90, 100, 100, 100}
			for i := range wantFirsts {
				if firsts[i] != wantFirsts[i] || lens[i] != wantLens[i] {
					t.Fatalf("blocks at %v of %v, want %v of %v", firsts, lens, wantFirsts, wantLens)
				}
			}
			st := s.Stats()
			if st.Gaps != 2 || st.MissingSamples != 60 || st.BadFrames != 1 || st.DiscardedBytes != 3920 {
				t.Fatalf("stats %+v, want 2 gaps, 60 missing, 1 bad frame, 3920 bytes discarded", st)
			}
		})
	}
}

// TestResyncAfterGarbage: garbage between frames (with false sync words)
// is skipped and counted; no sample is lost.
func TestResyncAfterGarbage(t *testing.T) {
	garbage := []byte{0xEB, 0x90, 0x82, 0x00, 0x10, 0x00, 0x00, 0x00, 'n', 'o', 'i', 's', 'e', 0xEB}
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			d := patternDevice(t, streamdev.Config{Faults: []streamdev.Fault{
				{Frame: 0, Kind: streamdev.Garbage, Bytes: garbage},
				{Frame: 3, Kind: streamdev.Garbage, Bytes: garbage},
			}})
			s := open(t, tr.cfg(t, d))
			s.Start()
			firsts, _ := checkPattern(t, s, 90, 900)
			for i, f := range firsts {
				if f != int64(90*i) {
					t.Fatalf("blocks at %v", firsts)
				}
			}
			if st := s.Stats(); st.Gaps != 0 || st.DiscardedBytes != uint64(2*len(garbage)) {
				t.Fatalf("stats %+v, want no gap and %d bytes discarded", st, 2*len(garbage))
			}
		})
	}
}

func openErr(t *testing.T, cfg *stream.Config) error {
	t.Helper()
	src, err := cfg.Open()
	if err == nil {
		src.Close()
		t.Fatal("Open succeeded")
	}
	return err
}

func TestHandshakeErrors(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			cases := []struct {
				dev  streamdev.Config
				want []string
			}{
				{streamdev.Config{Versions: []uint8{2, 3}}, []string{"speaks protocol version 2, 3, ephysd speaks 1", "update the firmware"}},
				{streamdev.Config{Announce: stream.Announce{Version: 4}}, []string{"speaks protocol version 4, ephysd speaks 1"}},
				{streamdev.Config{Silent: true}, []string{"no answer to the handshake within 300ms", "is the firmware running?"}},
				{streamdev.Config{Answer: []byte("Hello from sketch\r\n")}, []string{"19 bytes", "no valid frame", "48 65 6c 6c 6f"}},
				{streamdev.Config{Answer: stream.AppendLog(nil, stream.LogInfo, "booting")}, []string{"1 frames", "but no ANNOUNCE"}},
			}
			for _, c := range cases {
				d := patternDevice(t, c.dev)
				cfg := tr.cfg(t, d)
				cfg.TimeoutMS = 300
				err := openErr(t, cfg)
				for _, w := range c.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				want := "serial /dev/"
				if tr.name == "usb" {
					want = "usb 1209:0001"
				}
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not name the device (%s)", err, want)
				}
			}
		})
	}
}

func TestUSBErrors(t *testing.T) {
	cfg := stream.DefaultConfig()
	cfg.Transport = "usb"
	if err := openErr(t, &cfg); !strings.Contains(err.Error(), "usb transport not available in this build") {
		t.Fatal(err)
	}
	d := patternDevice(t, streamdev.Config{})
	cfg.Opener = d.Opener()
	cfg.PID = 0x0002
	if err := openErr(t, &cfg); !strings.Contains(err.Error(), "usb 1209:0002: no such device — is it plugged in") {
		t.Fatal(err)
	}
	cfg.PID = 1
	cfg.SerialNumber = stream.DefaultConfig().SerialNumber + "SD0001"
	s := open(t, &cfg)
	if s.Info().ProcessorName != "streamdev" {
		t.Fatal(s.Info().ProcessorName)
	}
}

// TestUnplug: the device goes away while streaming; ReadBlock returns an
// error that says so (not io.EOF), after the samples sent before.
func TestUnplug(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			d := patternDevice(t, streamdev.Config{Faults: []streamdev.Fault{{Frame: 20, Kind: streamdev.Unplug}}})
			s := open(t, tr.cfg(t, d))
			s.Start()
			b := newBlock(t, 64, 30)
			var err error
			n := 0
			for err == nil {
				b.Reset()
				if err = s.ReadBlock(b); err == nil {
					if b.FirstSample != int64(n) || b.Samples != 30 || b.Data[0] != float32(streamdev.PatternValue(uint64(n), 0))*0.195 {
						t.Fatalf("block at %d of %d samples, want %d", b.FirstSample, b.Samples, n)
					}
					n += b.Samples
				}
			}
			if err == io.EOF || !strings.Contains(err.Error(), "read failed") || !strings.Contains(err.Error(), "unplugged") {
				t.Fatalf("after unplug: %v", err)
			}
			// What was in flight may be lost with the device, never more.
			if n > 600 {
				t.Fatalf("%d samples before the unplug, want at most 600", n)
			}
			t.Log(err)
		})
	}
}

// TestStopUnblocks: Stop ends a pending ReadBlock with io.EOF and the
// device is told to stop.
func TestStopUnblocks(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			d := patternDevice(t, streamdev.Config{Realtime: true})
			s := open(t, tr.cfg(t, d))
			s.Start()
			b := newBlock(t, 64, 300000) // 10 s: pending until Stop
			done := make(chan error, 1)
			go func() { done <- s.ReadBlock(b) }()
			time.Sleep(100 * time.Millisecond)
			s.Stop()
			select {
			case err := <-done:
				if err != io.EOF {
					t.Fatalf("pending ReadBlock after Stop = %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Stop did not end the pending ReadBlock")
			}
			for i := 0; d.Streaming(); i++ {
				if i > 200 {
					t.Fatal("the device did not get STOP")
				}
				time.Sleep(10 * time.Millisecond)
			}
			if err := s.ReadBlock(b); err != io.EOF {
				t.Fatalf("ReadBlock after Stop = %v", err)
			}
		})
	}
}

// TestRealtimeNoGaps streams 1 s at the real pace of 64 channels × 30 kHz.
func TestRealtimeNoGaps(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			d := newDevice(t, streamdev.Config{Realtime: true})
			s := open(t, tr.cfg(t, d))
			s.Start()
			b := newBlock(t, 64, 300)
			for n := 0; n < 30000; n += b.Samples {
				b.Reset()
				if err := s.ReadBlock(b); err != nil {
					t.Fatal(err)
				}
			}
			if st := s.Stats(); st.Gaps != 0 || st.BadFrames != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// TestSimSamples: the emulator's default samples are the simulated
// headstage's, rounded to counts.
func TestSimSamples(t *testing.T) {
	d := newDevice(t, streamdev.Config{Seed: 3, Announce: stream.Announce{Channels: 8}})
	s := open(t, onUSB(t, d))
	s.Start()
	simCfg := sim.DefaultConfig()
	simCfg.Channels, simCfg.Realtime, simCfg.Seed = 8, false, 3
	ref, err := simCfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	ref.Start()
	defer ref.Close()
	b := newBlock(t, 8, 300)
	rb := newBlock(t, 8, 300)
	for k := 0; k < 10; k++ {
		b.Reset()
		rb.Reset()
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		if err := ref.ReadBlock(rb); err != nil {
			t.Fatal(err)
		}
		for i := range b.Data {
			if math.Abs(float64(b.Data[i]-rb.Data[i])) > 0.195/2+1e-4 {
				t.Fatalf("block %d value %d: %g, sim %g", k, i, b.Data[i], rb.Data[i])
			}
		}
		for i := range b.Digital {
			if b.Digital[i] != rb.Digital[i] {
				t.Fatalf("digital %d: %#x, sim %#x", i, b.Digital[i], rb.Digital[i])
			}
		}
	}
}

// TestProcessorNameSanitised: '.' and '/' in the device name do not reach
// folder names.
func TestProcessorNameSanitised(t *testing.T) {
	d := patternDevice(t, streamdev.Config{Announce: stream.Announce{Channels: 2, Name: "rig/2.v1"}})
	if n := open(t, onUSB(t, d)).Info().ProcessorName; n != "rig_2_v1" {
		t.Fatal(n)
	}
}

func TestFakeUSBTransfers(t *testing.T) {
	d := patternDevice(t, streamdev.Config{Announce: stream.Announce{Channels: 2, MaxSamples: 3}})
	u := d.USB()
	buf := make([]byte, 1024)
	if _, err := u.Read(streamdev.EndpointIn, buf, 10*time.Millisecond); !errors.Is(err, usb.ErrTimeout) {
		t.Fatalf("idle read: %v", err)
	}
	u.Write(streamdev.EndpointOut, stream.AppendHello(nil), time.Second)
	n, err := u.Read(streamdev.EndpointIn, buf[:50], time.Second)
	if err != streamdev.ErrOverflow || n != 0 {
		t.Fatalf("read of 50 bytes: %d %v, want overflow", n, err)
	}
	n, err = u.Read(streamdev.EndpointIn, buf, time.Second)
	if err != nil || n < stream.Overhead {
		t.Fatalf("announce read: %d %v", n, err)
	}
	d.Unplug()
	if _, err := u.Read(streamdev.EndpointIn, buf, time.Second); !errors.Is(err, usb.ErrNoDevice) {
		t.Fatalf("read after unplug: %v", err)
	}
}
