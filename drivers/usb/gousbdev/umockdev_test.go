package gousbdev

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/usb"
)

// insideUmockdev is set in the environment of the test binary re-run
// under umockdev-run.
const insideUmockdev = "EPHYSD_GOUSBDEV_UMOCKDEV"

// TestUmockdevFT232H runs the libusb code against a mocked FT232H: the
// test re-executes itself under umockdev-run with the device description
// testdata/ft232h.umockdev (sysfs attributes and descriptors of an FT232H,
// VID 0403 PID 6014, serial FT5X9ABC, on bus 1 address 2) and the usbdevfs
// script testdata/ft232h.ioctl, in which umockdev finds the URBs the
// program submits and compares their setup packets and OUT data byte for
// byte.
func TestUmockdevFT232H(t *testing.T) {
	if os.Getenv(insideUmockdev) != "1" {
		runner, err := exec.LookPath("umockdev-run")
		if err != nil {
			t.Skip("umockdev-run is not installed (Debian package umockdev): skipping the libusb smoke test")
		}
		cmd := exec.Command(runner,
			"--device", "testdata/ft232h.umockdev",
			"--ioctl", "/dev/bus/usb/001/002=testdata/ft232h.ioctl",
			"--", os.Args[0], "-test.run=^TestUmockdevFT232H$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), insideUmockdev+"=1")
		out, err := cmd.CombinedOutput()
		t.Logf("under umockdev-run:\n%s", out)
		if err != nil {
			t.Fatalf("umockdev run failed: %v", err)
		}
		if !strings.Contains(string(out), "--- PASS: TestUmockdevFT232H") {
			t.Fatalf("the test did not pass under umockdev-run")
		}
		return
	}
	var o Opener
	list, err := o.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var ft *usb.Info
	for i := range list {
		t.Logf("listed %v bus %d address %d %q %q access %q", list[i].ID, list[i].Bus, list[i].Address, list[i].Manufacturer, list[i].Product, list[i].Access)
		if list[i].VID == 0x0403 && list[i].PID == 0x6014 {
			ft = &list[i]
		}
	}
	if ft == nil {
		t.Fatalf("List did not find 0403:6014: %+v", list)
	}
	if ft.Serial != "FT5X9ABC" || ft.Bus != 1 || ft.Address != 2 || ft.Product != "Single RS232-HS" || ft.Manufacturer != "FTDI" {
		t.Errorf("listed %+v, want serial FT5X9ABC on bus 1 address 2, FTDI Single RS232-HS", *ft)
	}

	if _, err := o.Open(usb.ID{VID: 0x0403, PID: 0x6014, Serial: "NOSUCH"}, 0); err == nil || !errors.Is(err, usb.ErrNoDevice) || !strings.Contains(err.Error(), "FT5X9ABC") {
		t.Errorf("Open with a wrong serial: %v, want ErrNoDevice listing serial FT5X9ABC", err)
	}
	if _, err := o.Open(usb.ID{VID: 0x0403, PID: 0x6001}, 0); !errors.Is(err, usb.ErrNoDevice) {
		t.Errorf("Open of an absent FT232R: %v, want ErrNoDevice", err)
	}

	dev, err := o.Open(usb.ID{VID: 0x0403, PID: 0x6014, Serial: "FT5X9ABC"}, 0)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer func() {
		if err := dev.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}()
	if in, out := dev.MaxPacketSize(0x81), dev.MaxPacketSize(0x02); in != 512 || out != 512 {
		t.Errorf("MaxPacketSize(0x81, 0x02) = %d, %d; want 512, 512 (high-speed bulk)", in, out)
	}
	// Set bit mode: async bitbang, all 8 pins outputs. umockdev matches the
	// setup packet 40 0B FF 01 01 00 00 00 of the script.
	if _, err := dev.Control(usb.VendorOut, 0x0B, 0x01FF, 1, nil); err != nil {
		t.Fatalf("control OUT set bit mode 0x01FF: %v", err)
	}
	// A request the script does not have must fail: the comparison is real.
	if _, err := dev.Control(usb.VendorOut, 0x0B, 0x01FE, 1, nil); err == nil {
		t.Errorf("control OUT 0x01FE (not in the script) succeeded; umockdev should reject it")
	} else {
		t.Logf("control OUT not in the script: %v", err)
	}
	if n, err := dev.Write(0x02, []byte{0x05}, time.Second); err != nil || n != 1 {
		t.Fatalf("bulk OUT 05 to 0x02: n=%d err=%v", n, err)
	}
	if n, err := dev.Write(0x02, []byte{0x06}, 200*time.Millisecond); err == nil {
		t.Errorf("bulk OUT 06 (not in the script) succeeded (n=%d); umockdev should reject it", n)
	} else {
		t.Logf("bulk OUT not in the script: %v", err)
	}
	buf := make([]byte, 512)
	n, err := dev.Read(0x81, buf, time.Second)
	if err != nil || !bytes.Equal(buf[:n], []byte{0x31, 0x60, 0xAA}) {
		t.Errorf("bulk IN from 0x81: % x, %v; want 31 60 aa", buf[:n], err)
	}
}

// TestListWithoutBus checks that listing works (an empty list, no error)
// on a machine without USB, like the build machines.
func TestListWithoutBus(t *testing.T) {
	if os.Getenv(insideUmockdev) == "1" {
		t.Skip("inside umockdev")
	}
	list, err := Opener{}.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	t.Logf("%d USB devices", len(list))
}
