package pyrt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Interpreter is the Python installation the embedded runtime uses: its
// executable (which fixes sys.prefix and so the standard library and
// site-packages) and what that executable reports about itself.
type Interpreter struct {
	Executable string // absolute path given to the embedded interpreter as its program name
	Venv       string // the virtual environment folder, if one was chosen
	Version    string // "3.11.2", as the executable reports it
	Prefix     string // sys.prefix as the executable reports it
}

// DefaultExecutable is Debian's system Python of the version ephysd is
// linked against (/usr/bin/python3.11). PATH is never searched: a pyenv or
// conda python3 first on PATH must not be picked up by accident.
func DefaultExecutable() string {
	return "/usr/bin/python" + LinkedMinorVersion()
}

// ResolveInterpreter decides which Python to embed. venv, if set, is a
// virtual environment folder; otherwise executable, if set, is a Python
// executable; otherwise DefaultExecutable. The choice is checked by running
// it once: it must be the same major.minor version as the libpython ephysd
// is linked against.
func ResolveInterpreter(executable, venv string) (Interpreter, error) {
	in := Interpreter{}
	switch {
	case venv != "":
		dir, err := filepath.Abs(venv)
		if err != nil {
			return in, fmt.Errorf("python venv %s: %w", venv, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "pyvenv.cfg")); err != nil {
			return in, fmt.Errorf("python venv %s: no pyvenv.cfg there, so it is not a virtual environment (make one with: /usr/bin/python%s -m venv --system-site-packages %s)", dir, LinkedMinorVersion(), dir)
		}
		in.Venv = dir
		for _, name := range []string{"python3", "python", "python" + LinkedMinorVersion()} {
			p := filepath.Join(dir, "bin", name)
			if isExecutable(p) {
				in.Executable = p
				break
			}
		}
		if in.Executable == "" {
			return in, fmt.Errorf("python venv %s: no bin/python3 in it", dir)
		}
	case executable != "":
		if !strings.ContainsRune(executable, '/') {
			return in, fmt.Errorf("python executable %q: give a path (for example /usr/bin/python%s); ephysd does not search PATH, so that an unrelated Python first on PATH is never picked up", executable, LinkedMinorVersion())
		}
		p, err := filepath.Abs(executable)
		if err != nil {
			return in, fmt.Errorf("python executable %s: %w", executable, err)
		}
		if !isExecutable(p) {
			return in, fmt.Errorf("python executable %s: not found or not executable", p)
		}
		in.Executable = p
	default:
		in.Executable = DefaultExecutable()
		if !isExecutable(in.Executable) {
			return in, fmt.Errorf("python: the default interpreter %s is missing: install Debian's libpython%s-dev and python3-numpy (make run does), or choose one with python.executable / python.venv", in.Executable, LinkedMinorVersion())
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, in.Executable, "-I", "-c",
		"import sys; print('%d.%d.%d' % sys.version_info[:3]); print(sys.prefix)")
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8"}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return in, fmt.Errorf("python %s: could not run it to check its version: %v %s", in.Executable, err, strings.TrimSpace(errOut.String()))
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) < 2 {
		return in, fmt.Errorf("python %s: unexpected answer to a version check: %q", in.Executable, out.String())
	}
	in.Version = strings.TrimSpace(lines[0])
	in.Prefix = strings.TrimSpace(lines[1])
	if minor(in.Version) != LinkedMinorVersion() {
		return in, fmt.Errorf("python %s is Python %s, but ephysd is built against libpython %s: choose a Python %s interpreter (python.executable) or a virtual environment made from one (python.venv); the default is %s",
			in.Executable, in.Version, LinkedMinorVersion(), LinkedMinorVersion(), DefaultExecutable())
	}
	return in, nil
}

func minor(version string) string {
	parts := strings.SplitN(version, ".", 3)
	if len(parts) < 2 {
		return version
	}
	return parts[0] + "." + parts[1]
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// ErrNotInitialized is returned when Python is used before Start.
var ErrNotInitialized = errors.New("pyrt: the Python runtime is not started")
