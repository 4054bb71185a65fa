package daemon

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The files in systemd/ that make install puts in place.
const (
	unitFile     = "../systemd/ephysd.service"
	sysusersFile = "../systemd/ephysd.sysusers"
	rulesFile    = "../systemd/99-ephysd.rules"
	configFile   = "../systemd/ephysd.toml"
	// maxExposure is the highest `systemd-analyze security` score the unit
	// may have ("OK" ends at 4.9; it scores 1.7 now).
	maxExposure = 2.5
)

func systemdTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found: apt-get install systemd (make test installs it)", name)
	}
	return p
}

func runTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, systemdTool(t, name), args...)
	cmd.Env = append(os.Environ(), "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "LC_ALL=C.UTF-8")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestSystemdUnitVerify runs `systemd-analyze verify` on the unit, byte for
// byte as installed, and fails on any output: verify exits 0 on many
// warnings (unknown keys, bad values it ignores). It checks in a scratch root
// (--root) that holds the unit at its installed path, the system's own units
// it depends on, and a stand-in executable at every Exec*= path, since
// verify requires them to exist (it only checks that they are executable).
func TestSystemdUnitVerify(t *testing.T) {
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	put := func(path string, data []byte, mode os.FileMode) {
		t.Helper()
		p := filepath.Join(root, path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
	}
	put("/etc/systemd/system/ephysd.service", unit, 0o644)
	seen := map[string]bool{}
	for _, dir := range []string{"/usr/lib/systemd/system", "/lib/systemd/system"} {
		if real, err := filepath.EvalSymlinks(dir); err == nil && !seen[real] {
			seen[real] = true
			copyTree(t, dir, filepath.Join(root, dir))
		}
	}
	execs := execPaths(unit)
	if len(execs) == 0 {
		t.Fatal("no Exec*= lines with an absolute path in the unit")
	}
	for _, p := range execs {
		put(p, []byte("#!/bin/sh\nexit 0\n"), 0o755)
	}
	out, err := runTool(t, "systemd-analyze", "verify", "--root="+root, "/etc/systemd/system/ephysd.service")
	if err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unitFile, err, out)
	}
}

// TestSystemdUnitSecurity reports the unit's exposure score from
// `systemd-analyze security --offline=yes` and fails above maxExposure.
func TestSystemdUnitSecurity(t *testing.T) {
	out, err := runTool(t, "systemd-analyze", "security", "--offline=yes", "--no-pager", unitFile)
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in the output of systemd-analyze security:\n%s", out)
	}
	score, _ := strconv.ParseFloat(m[1], 64)
	t.Logf("systemd-analyze security: exposure %.1f %s", score, m[2])
	// The remaining exposures, with their weights.
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); strings.HasPrefix(l, "✗") {
			t.Log("  " + strings.Join(strings.Fields(l), " "))
		}
	}
	if score > maxExposure {
		t.Fatalf("exposure %.1f > %.1f: a hardening setting was lost\n%s", score, maxExposure, out)
	}
}

// TestSystemdUnitContract checks what the daemon and make install rely on.
func TestSystemdUnitContract(t *testing.T) {
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Type=notify", "NotifyAccess=main", "WatchdogSec=",
		"ExecStart=/usr/local/bin/ephysd run --config /etc/ephysd/ephysd.toml",
		"ExecReload=/bin/kill -HUP $MAINPID",
		"User=ephysd", "SupplementaryGroups=dialout plugdev",
		"StateDirectory=ephysd", "RuntimeDirectory=ephysd", "ConfigurationDirectory=ephysd",
		"DevicePolicy=closed", "DeviceAllow=char-ttyUSB rw", "DeviceAllow=char-ttyACM rw", "DeviceAllow=char-usb_device rw",
		"LimitMEMLOCK=infinity", "RestrictRealtime=no", "IPAddressAllow=localhost",
	} {
		if !hasLine(unit, want) {
			t.Errorf("%s: no line %q", unitFile, want)
		}
	}

	// make install puts the binary where ExecStart runs it, and the unit,
	// sysusers, udev rules and config where the unit and daemon expect them.
	if _, err := exec.LookPath("make"); err != nil {
		t.Log("make not installed: not checking the install target")
		return
	}
	cmd := exec.Command("make", "-n", "-s", "-C", "..", "install", "DESTDIR=/DESTDIR", "PREFIX=/usr/local")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make -n install: %v\n%s", err, out)
	}
	for _, want := range []string{
		"/DESTDIR/usr/local/bin/ephysd",
		"/DESTDIR/etc/systemd/system/ephysd.service",
		"/DESTDIR/usr/lib/sysusers.d/ephysd.conf",
		"/DESTDIR/etc/udev/rules.d/99-ephysd.rules",
		"/DESTDIR/etc/ephysd/ephysd.toml",
	} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("make install does not install %s:\n%s", want, out)
		}
	}
}

// TestSystemdSysusers checks the sysusers.d snippet with systemd-sysusers
// against an empty root.
func TestSystemdSysusers(t *testing.T) {
	abs, err := filepath.Abs(sysusersFile)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	out, err := runTool(t, "systemd-sysusers", "--root="+root, "--dry-run", abs)
	if err != nil || !strings.Contains(out, "Creating user 'ephysd'") {
		t.Fatalf("systemd-sysusers %s: %v\n%s", sysusersFile, err, out)
	}
}

// TestSystemdExampleConfig checks that the configuration make install puts
// in /etc/ephysd decodes (strictly) and records where the unit lets it.
func TestSystemdExampleConfig(t *testing.T) {
	data, err := os.ReadFile(configFile)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig("/etc/ephysd/ephysd.toml", data)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Source.Driver != "sim" {
		t.Errorf("source.driver %q, want sim so that the service runs without a device", cfg.Source.Driver)
	}
	if d := cfg.Recording.ParentDirectory; !strings.HasPrefix(d, "/var/lib/ephysd/") {
		t.Errorf("recording.parent_directory %q: the unit lets the service write only under /var/lib/ephysd (StateDirectory)", d)
	}
	if s := cfg.Control.Socket; !strings.HasPrefix(s, "/run/ephysd/") {
		t.Errorf("control.socket %q: the unit's RuntimeDirectory is /run/ephysd", s)
	}
	if h := cfg.Control.HTTP; h != "" && !strings.HasPrefix(h, "127.0.0.1:") && !strings.HasPrefix(h, "[::1]:") && !strings.HasPrefix(h, "localhost:") {
		t.Errorf("control.http %q: the unit allows loopback addresses only (IPAddressAllow=localhost)", h)
	}
}

// TestSystemdUdevRules checks the syntax of every rule (udevadm verify comes
// only with systemd 253): comma-separated KEY op "value" pairs.
func TestSystemdUdevRules(t *testing.T) {
	rules, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	pair := regexp.MustCompile(`^[A-Z_]+(\{[^{}"]+\})?(==|!=|=|\+=|-=|:=)"[^"]*"$`)
	sc := bufio.NewScanner(bytes.NewReader(rules))
	n, count := 0, 0
	for sc.Scan() {
		n++
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		count++
		for _, p := range strings.Split(l, ",") {
			if p = strings.TrimSpace(p); !pair.MatchString(p) {
				t.Errorf("%s:%d: %q is not KEY op \"value\"", rulesFile, n, p)
			}
		}
	}
	if count == 0 {
		t.Fatalf("%s has no rules", rulesFile)
	}
	if !bytes.Contains(rules, []byte(`ATTR{latency_timer}="1"`)) {
		t.Errorf("%s does not set the FTDI latency timer to 1 ms", rulesFile)
	}
}

// execPaths returns the absolute executables of the unit's Exec*= lines.
func execPaths(unit []byte) []string {
	var paths []string
	for _, l := range strings.Split(string(unit), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(l), "=")
		if !ok || !strings.HasPrefix(k, "Exec") {
			continue
		}
		v = strings.TrimLeft(strings.TrimSpace(v), "-@:+!|")
		if f := strings.Fields(v); len(f) > 0 && strings.HasPrefix(f[0], "/") {
			paths = append(paths, f[0])
		}
	}
	return paths
}

func hasLine(data []byte, line string) bool {
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), line) {
			return true
		}
	}
	return false
}

// copyTree copies a folder of unit files, keeping symbolic links as links
// (a missing src is no error: /lib may be /usr/lib).
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	if fi, err := os.Lstat(src); err != nil || !fi.IsDir() {
		return
	}
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type()&os.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			os.Remove(target)
			return os.Symlink(link, target)
		case d.Type().IsRegular():
			in, err := os.Open(p)
			if err != nil {
				return err
			}
			defer in.Close()
			out, err := os.Create(target)
			if err != nil {
				return err
			}
			if _, err := io.Copy(out, in); err != nil {
				out.Close()
				return err
			}
			return out.Close()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
