package daemon

import (
	"bytes"
	"strings"
	"testing"

	"github.com/ephysd/ephysd/drivers/usb"
)

func TestRecognise(t *testing.T) {
	cases := map[[2]string]string{
		{"0403", "6015"}: "openbci or spikerbox",
		{"2E73", "0001"}: "spikerbox",
		{"2341", "0043"}: "firmata",
		{"dead", "beef"}: "",
	}
	for id, want := range cases {
		k := recognise(id[0], id[1])
		got := ""
		if k != nil {
			got = k.serial
		}
		if got != want {
			t.Errorf("%v: %q, want %q", id, got, want)
		}
	}
}

type listOnly struct{ devs []usb.Info }

func (l listOnly) Open(usb.ID, int) (usb.Device, error) { return nil, usb.ErrNoDevice }
func (l listOnly) List() ([]usb.Info, error)            { return l.devs, nil }

func TestDevicesCommandListsUSB(t *testing.T) {
	old := USBOpener
	defer func() { USBOpener = old }()
	USBOpener = listOnly{[]usb.Info{
		{ID: usb.ID{VID: 0x0403, PID: 0x6014, Serial: "FT1234"}, Bus: 1, Address: 4, Product: "C232HM", Access: "permission denied (install systemd/99-ephysd.rules)"},
		{ID: usb.ID{VID: 0x046d, PID: 0xc52b}, Bus: 1, Address: 2, Product: "Unifying Receiver"},
	}}
	var out bytes.Buffer
	if err := devicesCommand(nil, &out, &out); err != nil {
		t.Fatal(err)
	}
	s := out.String()
	if !strings.Contains(s, "0403:6014") || !strings.Contains(s, "FT1234") || !strings.Contains(s, "ftdi") ||
		!strings.Contains(s, "permission denied") || strings.Contains(s, "Unifying") {
		t.Fatalf("output:\n%s", s)
	}
}
