// ephys_py.c — the C side of pyrt. See ephys_py.h.
//
// Threading: the interpreter is initialised on one OS thread (Go's pinned
// interpreter goroutine), which keeps its thread state for the life of the
// process and holds the GIL only inside calls from this file
// (PyEval_RestoreThread … PyEval_SaveThread). Loading modules may happen on
// any thread: those calls take the GIL with PyGILState_Ensure and release it
// before returning.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "ephys_py.h"
#include "_cgo_export.h"

struct ephys_stage {
	int id;
	char *name;

	// Current instance and its bound members (NULL when absent).
	PyObject *module;
	PyObject *instance;
	PyObject *m_process, *m_ttl, *m_spike;
	PyObject *m_hooks[4];

	// A loaded instance waiting for ephys_stage_commit.
	PyObject *pending_module;
	PyObject *pending_instance;

	PyObject *processor; // the oe_pyprocessor.PythonProcessor passed to __init__

	// Cached shape tuple for the data array.
	PyObject *shape;
	int shape_ch, shape_n;

	int64_t block_first;
	int block_samples;
	int accepting; // add_python_event is kept only while acquiring

	ephys_out_event events[EPHYS_MAX_EVENTS];
	int nevents;
	int64_t dropped;

	// Spikes queued by add_python_spike: records, and the electrode names
	// and waveforms they point into (buffers grown as needed and reused).
	int64_t spike_lookback; // how far before the block a spike's sample may lie
	ephys_out_spike spikes[EPHYS_MAX_SPIKES];
	int nspikes;
	int64_t spikes_dropped;
	char *spike_names;
	size_t spike_names_len, spike_names_cap;
	float *spike_waves;
	size_t spike_waves_len, spike_waves_cap;

	PyObject *exc_type, *exc_value, *exc_tb;
};

static PyThreadState *main_ts;
static pthread_t main_thread; // the interpreter thread, which ephys_interrupt signals

// The per-block call in progress, watched by the Go watchdog for hung
// scripts: (call id << 2) | CALL_*. Only the interpreter thread starts and
// ends calls; the watchdog may move an active call to CALL_ABANDONED.
#define CALL_IDLE 0
#define CALL_ACTIVE 1
#define CALL_ABANDONED 2
static uint64_t call_state;
static int call_stage;
static const char *call_what; // "process", "handle_ttl_event", a hook's name

// The call the watchdog wants interrupted and the TimeoutError's message.
// The message is written before interrupt_for (release) and read after it
// (acquire); it is only rewritten for a later call.
static int64_t interrupt_for = -1;
static char interrupt_msg[512];

static void call_begin(ephys_stage *st, const char *what) {
	__atomic_store_n(&call_stage, st->id, __ATOMIC_RELAXED);
	__atomic_store_n(&call_what, what, __ATOMIC_RELAXED);
	uint64_t id = (__atomic_load_n(&call_state, __ATOMIC_RELAXED) >> 2) + 1;
	__atomic_store_n(&call_state, id << 2 | CALL_ACTIVE, __ATOMIC_RELEASE);
}

// call_end ends the call and says what happened to it from outside:
// EPHYS_TIMED_OUT if the watchdog interrupted it, EPHYS_ABANDONED if it
// gave up waiting for it.
static int call_end(void) {
	uint64_t id = __atomic_load_n(&call_state, __ATOMIC_RELAXED) >> 2;
	uint64_t prev = __atomic_exchange_n(&call_state, id << 2 | CALL_IDLE, __ATOMIC_ACQ_REL);
	int flags = 0;
	if (__atomic_load_n(&interrupt_for, __ATOMIC_ACQUIRE) == (int64_t)id)
		flags |= EPHYS_TIMED_OUT;
	if ((prev & 3) == CALL_ABANDONED)
		flags |= EPHYS_ABANDONED;
	return flags;
}

int64_t ephys_call_state(int *status, int *stage, const char **what) {
	uint64_t s = __atomic_load_n(&call_state, __ATOMIC_ACQUIRE);
	*status = (int)(s & 3);
	*stage = __atomic_load_n(&call_stage, __ATOMIC_RELAXED);
	*what = __atomic_load_n(&call_what, __ATOMIC_RELAXED);
	return (int64_t)(s >> 2);
}

int ephys_interrupt(int64_t id, const char *msg) {
	uint64_t s = __atomic_load_n(&call_state, __ATOMIC_ACQUIRE);
	if ((int64_t)(s >> 2) != id || (s & 3) == CALL_IDLE)
		return 0;
	if (__atomic_load_n(&interrupt_for, __ATOMIC_RELAXED) != id) {
		snprintf(interrupt_msg, sizeof interrupt_msg, "%s", msg);
		__atomic_store_n(&interrupt_for, id, __ATOMIC_RELEASE);
	}
	// Python's C handler (installed by signal.signal in ephys_init, without
	// SA_RESTART) marks the signal tripped; the blocking call returns EINTR,
	// CPython runs the Python-level handler, which raises TimeoutError.
	return pthread_kill(main_thread, EPHYS_INTERRUPT_SIGNAL) == 0;
}

int ephys_abandon(int64_t id) {
	uint64_t want = (uint64_t)id << 2 | CALL_ACTIVE;
	return __atomic_compare_exchange_n(&call_state, &want, (uint64_t)id << 2 | CALL_ABANDONED, 0, __ATOMIC_ACQ_REL,
	                                   __ATOMIC_ACQUIRE);
}

int ephys_interrupt_signal(void) { return EPHYS_INTERRUPT_SIGNAL; }

static _Thread_local int on_interp_thread;
static _Thread_local ephys_stage *current_stage; // for module-level add_python_event and logs

static PyObject *np_ndarray, *np_float32, *np_frombuffer;
static PyObject *boot; // the _ephysd bootstrap module
static PyObject *str_reshape;
static PyObject *channel_names; // dict: processor id -> str

static const char *hook_names[4] = {"start_acquisition", "stop_acquisition", "start_recording", "stop_recording"};

// ---------------------------------------------------------------- oe_pyprocessor

typedef struct {
	PyObject_HEAD
	ephys_stage *stage;
} PythonProcessorObject;

static PyObject *queue_event(ephys_stage *st, PyObject *args, PyObject *kwargs) {
	static char *kwlist[] = {"line", "state", "sample_number", NULL};
	int line;
	PyObject *state;
	PyObject *sample = Py_None;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO|O:add_python_event", kwlist, &line, &state, &sample))
		return NULL;
	if (line < 0 || line > 255) {
		PyErr_Format(PyExc_ValueError, "add_python_event: line must be 0..255, got %d", line);
		return NULL;
	}
	int on = PyObject_IsTrue(state);
	if (on < 0)
		return NULL;
	int64_t sn = -1;
	if (sample != Py_None) {
		long long v = PyLong_AsLongLong(sample);
		if (v == -1 && PyErr_Occurred())
			return NULL;
		if (st->block_samples > 0 && (v < st->block_first || v >= st->block_first + st->block_samples)) {
			PyErr_Format(PyExc_ValueError,
			             "add_python_event: sample_number %lld is outside the current block [%lld, %lld)",
			             v, (long long)st->block_first, (long long)(st->block_first + st->block_samples));
			return NULL;
		}
		sn = v;
	}
	if (!st->accepting)
		Py_RETURN_NONE; // Open Ephys drops events queued while acquisition is not running
	if (st->nevents >= EPHYS_MAX_EVENTS) {
		st->dropped++;
		Py_RETURN_NONE;
	}
	ephys_out_event *e = &st->events[st->nevents++];
	e->line = line;
	e->state = on;
	e->sample = sn;
	Py_RETURN_NONE;
}

static PyObject *PythonProcessor_add_python_event(PythonProcessorObject *self, PyObject *args, PyObject *kwargs) {
	if (self->stage == NULL) {
		PyErr_SetString(PyExc_RuntimeError, "add_python_event: this PythonProcessor is not attached to an ephysd stage");
		return NULL;
	}
	return queue_event(self->stage, args, kwargs);
}

static PyObject *PythonProcessor_get_sample_number(PythonProcessorObject *self, void *closure) {
	if (self->stage == NULL)
		Py_RETURN_NONE;
	return PyLong_FromLongLong(self->stage->block_first);
}

static PyObject *PythonProcessor_get_stage_id(PythonProcessorObject *self, void *closure) {
	return PyLong_FromLong(self->stage ? self->stage->id : -1);
}

// ---------------------------------------------------------------- add_python_spike

static PyObject *np_ascontiguousarray; // fetched at the first add_python_spike

// spike_int reads an int argument of add_python_spike (an int or anything
// with __index__, such as numpy.int64, but not bool or float).
static int spike_int(PyObject *o, const char *what, long long *out) {
	if (PyBool_Check(o) || !PyIndex_Check(o)) {
		PyErr_Format(PyExc_TypeError, "add_python_spike: %s must be an int, got %.100s", what, Py_TYPE(o)->tp_name);
		return -1;
	}
	PyObject *i = PyNumber_Index(o);
	if (i == NULL)
		return -1;
	int overflow = 0;
	*out = PyLong_AsLongLongAndOverflow(i, &overflow);
	Py_DECREF(i);
	if (*out == -1 && PyErr_Occurred())
		return -1;
	if (overflow) {
		PyErr_Format(PyExc_ValueError, "add_python_spike: %s does not fit in 64 bits", what);
		return -1;
	}
	return 0;
}

// spike_grow makes room for n more items of size bytes in *buf.
static int spike_grow(void **buf, size_t *cap, size_t len, size_t n, size_t size) {
	if (len + n <= *cap)
		return 0;
	size_t c = *cap ? *cap : 256;
	while (c < len + n)
		c *= 2;
	void *p = realloc(*buf, c * size);
	if (p == NULL) {
		PyErr_NoMemory();
		return -1;
	}
	*buf = p;
	*cap = c;
	return 0;
}

static PyObject *queue_spike(ephys_stage *st, PyObject *args, PyObject *kwargs) {
	static char *kwlist[] = {"electrode_name", "sample_number", "sorted_id", "waveform", NULL};
	PyObject *name, *sample, *sorted, *wave = Py_None;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O:add_python_spike", kwlist, &name, &sample, &sorted, &wave))
		return NULL;
	if (!PyUnicode_Check(name)) {
		PyErr_Format(PyExc_TypeError, "add_python_spike: electrode_name must be a str, got %.100s", Py_TYPE(name)->tp_name);
		return NULL;
	}
	Py_ssize_t nlen;
	const char *nm = PyUnicode_AsUTF8AndSize(name, &nlen);
	if (nm == NULL)
		return NULL;
	if (nlen == 0 || nlen > EPHYS_MAX_ELECTRODE_NAME || memchr(nm, 0, (size_t)nlen) != NULL) {
		PyErr_Format(PyExc_ValueError,
		             "add_python_spike: electrode_name %R must be 1 to %d bytes of UTF-8 without NUL characters", name,
		             EPHYS_MAX_ELECTRODE_NAME);
		return NULL;
	}
	long long sn, sid;
	if (spike_int(sample, "sample_number", &sn) < 0 || spike_int(sorted, "sorted_id", &sid) < 0)
		return NULL;
	if (st->block_samples > 0) {
		long long lo = st->block_first - st->spike_lookback, hi = st->block_first + st->block_samples;
		if (sn < lo || sn >= hi) {
			PyErr_Format(PyExc_ValueError,
			             "add_python_spike: sample_number %lld is outside [%lld, %lld): a spike's sample must lie in the "
			             "current block [%lld, %lld) or at most %lld samples (1 s) before it",
			             sn, lo, hi, (long long)st->block_first, hi, (long long)st->spike_lookback);
			return NULL;
		}
	} else if (sn < 0) {
		PyErr_Format(PyExc_ValueError, "add_python_spike: sample_number must be >= 0, got %lld", sn);
		return NULL;
	}
	if (sid < 0 || sid > 65535) {
		PyErr_Format(PyExc_ValueError,
		             "add_python_spike: sorted_id must be 0..65535 (recorded as uint16 in clusters.npy), got %lld", sid);
		return NULL;
	}

	int from_block = -1, channels = 0, samples = 0;
	PyObject *arr = NULL;
	Py_buffer view;
	int have_view = 0;
	if (wave == Py_None) {
		from_block = goPyrtFindSpike(st->id, (char *)nm, (int)nlen, (int64_t)sn, &channels, &samples);
		if (from_block < 0) {
			PyErr_Format(PyExc_ValueError,
			             "add_python_spike: waveform=None takes the waveform of the spike of electrode %R at sample %lld "
			             "that came with this block, and there is none: pass waveform=<array of shape (channels, samples)>",
			             name, sn);
			return NULL;
		}
	} else {
		if (np_ascontiguousarray == NULL) {
			PyObject *np = PyImport_ImportModule("numpy");
			if (np == NULL)
				return NULL;
			np_ascontiguousarray = PyObject_GetAttrString(np, "ascontiguousarray");
			Py_DECREF(np);
			if (np_ascontiguousarray == NULL)
				return NULL;
		}
		arr = PyObject_CallFunctionObjArgs(np_ascontiguousarray, wave, np_float32, NULL);
		if (arr == NULL) {
			if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_ValueError)) {
				PyObject *t, *v, *tb;
				PyErr_Fetch(&t, &v, &tb);
				PyErr_Format(PyExc_TypeError,
				             "add_python_spike: waveform must be an array of numbers of shape (channels, samples) "
				             "that converts to float32 (%S)",
				             v ? v : Py_None);
				Py_XDECREF(t);
				Py_XDECREF(v);
				Py_XDECREF(tb);
			}
			return NULL;
		}
		if (PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
			Py_DECREF(arr);
			return NULL;
		}
		have_view = 1;
		if (view.ndim != 2) {
			PyErr_Format(PyExc_ValueError,
			             "add_python_spike: waveform must be 2-D (channels, samples), got %d dimension%s%s", view.ndim,
			             view.ndim == 1 ? "" : "s",
			             view.ndim == 1 ? " (for one channel pass waveform[numpy.newaxis, :])" : "");
			goto fail;
		}
		if (view.shape[0] < 1 || view.shape[1] < 1 ||
		    view.shape[0] * view.shape[1] > EPHYS_MAX_SPIKE_VALUES) {
			PyErr_Format(PyExc_ValueError,
			             "add_python_spike: waveform has shape (%zd, %zd): it needs 1 or more channels and samples, and "
			             "at most %d values in all",
			             view.shape[0], view.shape[1], EPHYS_MAX_SPIKE_VALUES);
			goto fail;
		}
		channels = (int)view.shape[0];
		samples = (int)view.shape[1];
	}

	if (!st->accepting || st->nspikes >= EPHYS_MAX_SPIKES) {
		// Like events, spikes queued while acquisition is not running are
		// dropped; past EPHYS_MAX_SPIKES in one block they are counted.
		if (st->accepting)
			st->spikes_dropped++;
		goto done;
	}
	size_t nvals = from_block >= 0 ? 0 : (size_t)channels * (size_t)samples;
	if (spike_grow((void **)&st->spike_names, &st->spike_names_cap, st->spike_names_len, (size_t)nlen, 1) < 0 ||
	    spike_grow((void **)&st->spike_waves, &st->spike_waves_cap, st->spike_waves_len, nvals, sizeof(float)) < 0)
		goto fail;
	ephys_out_spike *o = &st->spikes[st->nspikes++];
	o->sample = sn;
	o->sorted_id = (int32_t)sid;
	o->channels = channels;
	o->samples = samples;
	o->from_block = from_block;
	o->name_off = (int32_t)st->spike_names_len;
	o->name_len = (int32_t)nlen;
	memcpy(st->spike_names + st->spike_names_len, nm, (size_t)nlen);
	st->spike_names_len += (size_t)nlen;
	o->wave_off = (int64_t)st->spike_waves_len;
	if (nvals > 0) {
		memcpy(st->spike_waves + st->spike_waves_len, view.buf, nvals * sizeof(float));
		st->spike_waves_len += nvals;
	}
done:
	if (have_view)
		PyBuffer_Release(&view);
	Py_XDECREF(arr);
	Py_RETURN_NONE;
fail:
	if (have_view)
		PyBuffer_Release(&view);
	Py_XDECREF(arr);
	return NULL;
}

static PyObject *PythonProcessor_add_python_spike(PythonProcessorObject *self, PyObject *args, PyObject *kwargs) {
	if (self->stage == NULL) {
		PyErr_SetString(PyExc_RuntimeError, "add_python_spike: this PythonProcessor is not attached to an ephysd stage");
		return NULL;
	}
	return queue_spike(self->stage, args, kwargs);
}

static PyMethodDef PythonProcessor_methods[] = {
	{"add_python_event", (PyCFunction)(void (*)(void))PythonProcessor_add_python_event, METH_VARARGS | METH_KEYWORDS,
	 "add_python_event(line, state, sample_number=None)\n--\n\n"
	 "Queue a TTL event on the stage's output channel. Without sample_number the event\n"
	 "is stamped with the block's first sample number (as in Open Ephys)."},
	{"add_python_spike", (PyCFunction)(void (*)(void))PythonProcessor_add_python_spike, METH_VARARGS | METH_KEYWORDS,
	 "add_python_spike(electrode_name, sample_number, sorted_id, waveform=None)\n--\n\n"
	 "Emit a spike from this stage (ephysd extension): it reaches later stages' handle_spike and\n"
	 "the recording. waveform is a (channels, samples) array in uV; None takes the waveform of\n"
	 "the spike of that electrode and sample number that came with this block (relabelling)."},
	{NULL}};

static PyGetSetDef PythonProcessor_getset[] = {
	{"sample_number", (getter)PythonProcessor_get_sample_number, NULL,
	 "first sample number of the block being processed (ephysd extension)", NULL},
	{"node_id", (getter)PythonProcessor_get_stage_id, NULL, "this stage's processor id (ephysd extension)", NULL},
	{NULL}};

static PyTypeObject PythonProcessorType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "oe_pyprocessor.PythonProcessor",
	.tp_basicsize = sizeof(PythonProcessorObject),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "The processor object passed to PyProcessor.__init__.",
	.tp_methods = PythonProcessor_methods,
	.tp_getset = PythonProcessor_getset,
	.tp_new = PyType_GenericNew,
};

static PyObject *module_add_python_event(PyObject *mod, PyObject *args, PyObject *kwargs) {
	if (current_stage == NULL) {
		PyErr_SetString(PyExc_RuntimeError, "oe_pyprocessor.add_python_event called outside a stage call");
		return NULL;
	}
	return queue_event(current_stage, args, kwargs);
}

static PyObject *module_log(PyObject *mod, PyObject *args) {
	int stream;
	const char *text;
	Py_ssize_t n;
	if (!PyArg_ParseTuple(args, "is#", &stream, &text, &n))
		return NULL;
	int id = current_stage ? current_stage->id : 0;
	Py_BEGIN_ALLOW_THREADS
	goPyrtLog(id, stream, (char *)text, (int)n);
	Py_END_ALLOW_THREADS
	Py_RETURN_NONE;
}

// _interrupt_due: the TimeoutError message if the watchdog asked to
// interrupt the call in progress, else None. The signal handler asks it, so
// that a stray or late signal does not hit another call.
static PyObject *module_interrupt_due(PyObject *mod, PyObject *unused) {
	uint64_t s = __atomic_load_n(&call_state, __ATOMIC_ACQUIRE);
	if ((s & 3) == CALL_IDLE || __atomic_load_n(&interrupt_for, __ATOMIC_ACQUIRE) != (int64_t)(s >> 2))
		Py_RETURN_NONE;
	return PyUnicode_FromString(interrupt_msg);
}

static PyMethodDef oe_methods[] = {
	{"add_python_event", (PyCFunction)(void (*)(void))module_add_python_event, METH_VARARGS | METH_KEYWORDS,
	 "add_python_event(line, state, sample_number=None): queue an event from the stage being called."},
	{"_log", module_log, METH_VARARGS, "internal: a line of the stage's stdout (1) or stderr (2)"},
	{"_interrupt_due", module_interrupt_due, METH_NOARGS, "internal: the watchdog's TimeoutError message, or None"},
	{NULL}};

static struct PyModuleDef oe_module = {PyModuleDef_HEAD_INIT, "oe_pyprocessor",
                                       "Open Ephys Python Processor API, as provided by ephysd.", -1, oe_methods};

static PyObject *PyInit_oe_pyprocessor(void) {
	if (PyType_Ready(&PythonProcessorType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&oe_module);
	if (m == NULL)
		return NULL;
	Py_INCREF(&PythonProcessorType);
	if (PyModule_AddObject(m, "PythonProcessor", (PyObject *)&PythonProcessorType) < 0) {
		Py_DECREF(&PythonProcessorType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}

// ---------------------------------------------------------------- bootstrap

static const char *boot_source =
	"import sys, io, inspect, traceback, importlib.util, importlib.machinery\n"
	"import oe_pyprocessor as _oe\n"
	"class _Stream(io.TextIOBase):\n"
	"    def __init__(self, which):\n"
	"        self._which = which\n"
	"        self._buf = ''\n"
	"    encoding = 'utf-8'\n"
	"    errors = 'replace'\n"
	"    def writable(self):\n"
	"        return True\n"
	"    def isatty(self):\n"
	"        return False\n"
	"    def write(self, s):\n"
	"        if not isinstance(s, str):\n"
	"            raise TypeError('write() argument must be str, not ' + type(s).__name__)\n"
	"        self._buf += s\n"
	"        if '\\n' in self._buf:\n"
	"            lines = self._buf.split('\\n')\n"
	"            self._buf = lines.pop()\n"
	"            for line in lines:\n"
	"                _oe._log(self._which, line)\n"
	"        return len(s)\n"
	"    def flush(self):\n"
	"        if self._buf:\n"
	"            b, self._buf = self._buf, ''\n"
	"            _oe._log(self._which, b)\n"
	"import signal as _signal\n"
	"_signal_signal = _signal.signal\n"
	"def _ephysd_signal(signalnum, handler):\n"
	"    # ephysd owns the process's signals (SIGINT/SIGTERM stop it cleanly);\n"
	"    # a handler installed here would silently take them from it.\n"
	"    _oe._log(2, 'ephysd: signal.signal(%r, ...) ignored: the daemon handles signals' % (signalnum,))\n"
	"    return _signal.getsignal(signalnum)\n"
	"_signal.signal = _ephysd_signal\n"
	"def _ephysd_interrupt(signum, frame):\n"
	"    # ephysd's watchdog signals the interpreter thread when a call runs past\n"
	"    # python.block_timeout_ms; CPython runs this handler at the next\n"
	"    # bytecode or when the blocking call it is in returns EINTR.\n"
	"    msg = _oe._interrupt_due()\n"
	"    if msg is not None:\n"
	"        raise TimeoutError(msg)\n"
	"def install_interrupt(signum):\n"
	"    _signal_signal(signum, _ephysd_interrupt)\n"
	"def clear_frames(v):\n"
	"    # The frames of a kept traceback would hold the script's locals\n"
	"    # (the block's data array among them) until the error is taken.\n"
	"    todo, seen = [v], set()\n"
	"    while todo:\n"
	"        e = todo.pop()\n"
	"        if e is None or id(e) in seen:\n"
	"            continue\n"
	"        seen.add(id(e))\n"
	"        traceback.clear_frames(e.__traceback__)\n"
	"        todo.append(e.__cause__)\n"
	"        todo.append(e.__context__)\n"
	"sys.stdout = _Stream(1)\n"
	"sys.stderr = _Stream(2)\n"
	"class _FreshLoader(importlib.machinery.SourceFileLoader):\n"
	"    # Compiles the stage's file at every load, never from a cached .pyc:\n"
	"    # one is stale when the file was rewritten within the same second\n"
	"    # at the same size (a reload right after an edit).\n"
	"    def get_code(self, fullname):\n"
	"        return compile(self.get_data(self.path), self.path, 'exec', dont_inherit=True)\n"
	"def load(modname, path, folder):\n"
	"    if folder not in sys.path:\n"
	"        sys.path.insert(0, folder)\n"
	"    spec = importlib.util.spec_from_file_location(modname, path)\n"
	"    if spec is None or spec.loader is None:\n"
	"        raise ImportError('cannot import %s: not a Python source file' % path)\n"
	"    spec = importlib.util.spec_from_file_location(modname, path, loader=_FreshLoader(modname, path))\n"
	"    mod = importlib.util.module_from_spec(spec)\n"
	"    old = sys.modules.get(modname)\n"
	"    sys.modules[modname] = mod\n"
	"    try:\n"
	"        spec.loader.exec_module(mod)\n"
	"    except BaseException:\n"
	"        if old is not None:\n"
	"            sys.modules[modname] = old\n"
	"        else:\n"
	"            sys.modules.pop(modname, None)\n"
	"        raise\n"
	"    return mod\n"
	"def instantiate(mod, processor, num_channels, sample_rate):\n"
	"    cls = getattr(mod, 'PyProcessor', None)\n"
	"    if cls is None:\n"
	"        raise AttributeError('%s defines no class PyProcessor' % mod.__file__)\n"
	"    if not callable(getattr(cls, 'process', None)):\n"
	"        raise AttributeError('%s: class PyProcessor has no process(self, data) method, which is required' % mod.__file__)\n"
	"    init = cls.__init__\n"
	"    if init is object.__init__:\n"
	"        return cls()\n"
	"    try:\n"
	"        params = list(inspect.signature(init).parameters.values())\n"
	"    except (TypeError, ValueError):\n"
	"        params = None\n"
	"    if params is not None:\n"
	"        P = inspect.Parameter\n"
	"        positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]\n"
	"        varargs = any(p.kind == P.VAR_POSITIONAL for p in params)\n"
	"        if not varargs and len(positional) == 3:\n"
	"            return cls(num_channels, sample_rate)\n"
	"    return cls(processor, num_channels, sample_rate)\n"
	"def format_error(t, v, tb, full):\n"
	"    if full:\n"
	"        te = traceback.TracebackException(t, v, tb)\n"
	"        # the watchdog's handler is not the script's code\n"
	"        te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != '<ephysd>'])\n"
	"        return ''.join(te.format()).rstrip()\n"
	"    return ''.join(traceback.format_exception_only(t, v)).rstrip()\n";

static char *fetch_error_text(void) {
	// Formats and clears the current Python exception. GIL held.
	PyObject *t, *v, *tb;
	PyErr_Fetch(&t, &v, &tb);
	if (t == NULL)
		return strdup("unknown Python error");
	PyErr_NormalizeException(&t, &v, &tb);
	char *out = NULL;
	if (boot != NULL) {
		PyObject *s = PyObject_CallMethod(boot, "format_error", "OOOi", t, v ? v : Py_None, tb ? tb : Py_None, 1);
		if (s != NULL) {
			const char *u = PyUnicode_AsUTF8(s);
			if (u)
				out = strdup(u);
			Py_DECREF(s);
		}
		PyErr_Clear();
	}
	if (out == NULL) {
		PyObject *s = v ? PyObject_Str(v) : NULL;
		const char *u = s ? PyUnicode_AsUTF8(s) : NULL;
		out = strdup(u ? u : "Python error (unprintable)");
		Py_XDECREF(s);
		PyErr_Clear();
	}
	Py_XDECREF(t);
	Py_XDECREF(v);
	Py_XDECREF(tb);
	return out;
}

int ephys_init(const char *program, const char *stdlib_check, double switch_interval, char **err) {
	if (Py_IsInitialized()) {
		*err = strdup("Python is already initialised in this process");
		return -1;
	}
	if (PyImport_AppendInittab("oe_pyprocessor", PyInit_oe_pyprocessor) < 0) {
		*err = strdup("cannot register the oe_pyprocessor module");
		return -1;
	}
	PyStatus status;
	PyConfig config;
	PyConfig_InitIsolatedConfig(&config);
	config.install_signal_handlers = 0;
	config.site_import = 1;
	config.user_site_directory = 0;
	config.parse_argv = 0;
	config.buffered_stdio = 0;
	status = PyConfig_SetBytesString(&config, &config.program_name, program);
	if (!PyStatus_Exception(status))
		status = PyConfig_SetBytesString(&config, &config.executable, program);
	if (!PyStatus_Exception(status))
		status = Py_InitializeFromConfig(&config);
	PyConfig_Clear(&config);
	if (PyStatus_Exception(status)) {
		const char *m = status.err_msg ? status.err_msg : "unknown error";
		const char *f = status.func ? status.func : "";
		size_t n = strlen(m) + strlen(f) + 64;
		*err = malloc(n);
		snprintf(*err, n, "Python initialisation failed: %s%s%s", f, *f ? ": " : "", m);
		return -1;
	}
	on_interp_thread = 1;
	main_thread = pthread_self();

	PyObject *sys = PyImport_ImportModule("sys");
	if (sys != NULL) {
		PyObject *r = PyObject_CallMethod(sys, "setswitchinterval", "d", switch_interval);
		Py_XDECREF(r);
		Py_DECREF(sys);
	}
	if (PyErr_Occurred())
		goto fail;

	PyObject *code = Py_CompileString(boot_source, "<ephysd>", Py_file_input);
	if (code == NULL)
		goto fail;
	boot = PyImport_ExecCodeModule("_ephysd", code);
	Py_DECREF(code);
	if (boot == NULL)
		goto fail;
	PyObject *inst = PyObject_CallMethod(boot, "install_interrupt", "i", EPHYS_INTERRUPT_SIGNAL);
	if (inst == NULL)
		goto fail;
	Py_DECREF(inst);

	PyObject *np = PyImport_ImportModule("numpy");
	if (np == NULL) {
		char *e = fetch_error_text();
		size_t n = strlen(e) + 256;
		*err = malloc(n);
		snprintf(*err, n, "numpy cannot be imported by the embedded Python (%s): %s", stdlib_check, e);
		free(e);
		main_ts = PyEval_SaveThread();
		return -2;
	}
	np_ndarray = PyObject_GetAttrString(np, "ndarray");
	np_float32 = PyObject_GetAttrString(np, "float32");
	np_frombuffer = PyObject_GetAttrString(np, "frombuffer");
	Py_DECREF(np);
	str_reshape = PyUnicode_InternFromString("reshape");
	channel_names = PyDict_New();
	if (!np_ndarray || !np_float32 || !np_frombuffer || !str_reshape || !channel_names)
		goto fail;
	main_ts = PyEval_SaveThread();
	return 0;
fail:
	*err = fetch_error_text();
	main_ts = PyEval_SaveThread();
	return -1;
}

int ephys_is_initialized(void) { return Py_IsInitialized(); }

const char *ephys_linked_version(void) { return PY_VERSION; }

int ephys_on_thread(void) { return on_interp_thread; }

char *ephys_sys_info(void) {
	PyGILState_STATE g = PyGILState_Ensure();
	char *out = NULL;
	PyObject *r = PyRun_String(
		"__import__('sys').prefix + '\\n' + __import__('sys').executable + '\\n' + "
		"'%d.%d.%d' % __import__('sys').version_info[:3] + '\\n' + __import__('numpy').__version__",
		Py_eval_input, PyModule_GetDict(boot), PyModule_GetDict(boot));
	if (r != NULL) {
		const char *u = PyUnicode_AsUTF8(r);
		out = strdup(u ? u : "");
		Py_DECREF(r);
	} else {
		out = fetch_error_text();
	}
	PyGILState_Release(g);
	return out;
}

int ephys_run_string(const char *src, char **err) {
	PyGILState_STATE g = PyGILState_Ensure();
	int rc = 0;
	PyObject *globals = PyDict_New();
	PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins());
	PyObject *r = PyRun_String(src, Py_file_input, globals, globals);
	if (r == NULL) {
		*err = fetch_error_text();
		rc = 1;
	}
	Py_XDECREF(r);
	Py_DECREF(globals);
	PyGILState_Release(g);
	return rc;
}

int ephys_register_channel(int processor_id, const char *name) {
	PyGILState_STATE g = PyGILState_Ensure();
	int rc = -1;
	PyObject *k = PyLong_FromLong(processor_id);
	PyObject *v = PyUnicode_FromString(name);
	if (k && v)
		rc = PyDict_SetItem(channel_names, k, v);
	Py_XDECREF(k);
	Py_XDECREF(v);
	PyErr_Clear();
	PyGILState_Release(g);
	return rc;
}

// ---------------------------------------------------------------- stages

ephys_stage *ephys_stage_new(int id, const char *name) {
	ephys_stage *st = calloc(1, sizeof(ephys_stage));
	if (st == NULL)
		return NULL;
	st->id = id;
	st->name = strdup(name);
	PyGILState_STATE g = PyGILState_Ensure();
	PythonProcessorObject *p = PyObject_New(PythonProcessorObject, &PythonProcessorType);
	if (p != NULL)
		p->stage = st;
	st->processor = (PyObject *)p;
	PyErr_Clear();
	PyGILState_Release(g);
	if (st->processor == NULL) {
		free(st->name);
		free(st);
		return NULL;
	}
	return st;
}

int ephys_stage_load(ephys_stage *st, const char *path, const char *modname, int channels, double rate, char **err) {
	PyGILState_STATE g = PyGILState_Ensure();
	ephys_stage *prev = current_stage;
	current_stage = st;
	int rc = 0;
	PyObject *mod = NULL, *inst = NULL;
	char *folder = strdup(path);
	char *slash = strrchr(folder, '/');
	if (slash != NULL)
		*slash = 0;
	mod = PyObject_CallMethod(boot, "load", "sss", modname, path, slash ? folder : ".");
	free(folder);
	if (mod == NULL) {
		*err = fetch_error_text();
		rc = 1;
		goto out;
	}
	inst = PyObject_CallMethod(boot, "instantiate", "OOid", mod, st->processor, channels, rate);
	if (inst == NULL) {
		*err = fetch_error_text();
		rc = 2;
		Py_DECREF(mod);
		goto out;
	}
	Py_XDECREF(st->pending_module);
	Py_XDECREF(st->pending_instance);
	st->pending_module = mod;
	st->pending_instance = inst;
out:
	current_stage = prev;
	PyGILState_Release(g);
	return rc;
}

static void clear_current(ephys_stage *st) {
	Py_CLEAR(st->m_process);
	Py_CLEAR(st->m_ttl);
	Py_CLEAR(st->m_spike);
	for (int i = 0; i < 4; i++)
		Py_CLEAR(st->m_hooks[i]);
	Py_CLEAR(st->instance);
	Py_CLEAR(st->module);
}

static PyObject *optional_member(PyObject *inst, const char *name) {
	PyObject *m = PyObject_GetAttrString(inst, name);
	if (m == NULL || !PyCallable_Check(m)) {
		Py_XDECREF(m);
		PyErr_Clear();
		return NULL;
	}
	return m;
}

int ephys_stage_commit(ephys_stage *st) {
	if (!on_interp_thread)
		return -1;
	PyEval_RestoreThread(main_ts);
	int rc = 0;
	if (st->pending_instance == NULL) {
		rc = 2;
	} else {
		clear_current(st);
		st->module = st->pending_module;
		st->instance = st->pending_instance;
		st->pending_module = st->pending_instance = NULL;
		st->m_process = optional_member(st->instance, "process");
		st->m_ttl = optional_member(st->instance, "handle_ttl_event");
		st->m_spike = optional_member(st->instance, "handle_spike");
		for (int i = 0; i < 4; i++)
			st->m_hooks[i] = optional_member(st->instance, hook_names[i]);
	}
	main_ts = PyEval_SaveThread();
	return rc;
}

void ephys_stage_discard(ephys_stage *st) {
	PyGILState_STATE g = PyGILState_Ensure();
	Py_CLEAR(st->pending_module);
	Py_CLEAR(st->pending_instance);
	PyGILState_Release(g);
}

int ephys_stage_has_current(ephys_stage *st) { return st->instance != NULL && st->m_process != NULL; }

void ephys_stage_set_accepting(ephys_stage *st, int on) { st->accepting = on; }

static void keep_error(ephys_stage *st) {
	Py_XDECREF(st->exc_type);
	Py_XDECREF(st->exc_value);
	Py_XDECREF(st->exc_tb);
	PyErr_Fetch(&st->exc_type, &st->exc_value, &st->exc_tb);
	PyErr_NormalizeException(&st->exc_type, &st->exc_value, &st->exc_tb);
	if (st->exc_value != NULL && st->exc_tb != NULL) {
		PyException_SetTraceback(st->exc_value, st->exc_tb);
		PyObject *r = PyObject_CallMethod(boot, "clear_frames", "O", st->exc_value);
		Py_XDECREF(r);
		PyErr_Clear();
	}
}

char *ephys_stage_error(ephys_stage *st, int full) {
	if (st->exc_type == NULL)
		return NULL;
	PyGILState_STATE g = PyGILState_Ensure();
	char *out = NULL;
	if (full < 0) { // only clear: the frames of a traceback hold the script's locals alive
		Py_CLEAR(st->exc_type);
		Py_CLEAR(st->exc_value);
		Py_CLEAR(st->exc_tb);
		PyGILState_Release(g);
		return NULL;
	}
	PyObject *s = PyObject_CallMethod(boot, "format_error", "OOOi", st->exc_type, st->exc_value ? st->exc_value : Py_None,
	                                  st->exc_tb ? st->exc_tb : Py_None, full);
	if (s != NULL) {
		const char *u = PyUnicode_AsUTF8(s);
		out = strdup(u ? u : "");
		Py_DECREF(s);
	}
	if (out == NULL) {
		PyErr_Clear();
		out = strdup("Python error (could not be formatted)");
	}
	Py_CLEAR(st->exc_type);
	Py_CLEAR(st->exc_value);
	Py_CLEAR(st->exc_tb);
	PyGILState_Release(g);
	return out;
}

int ephys_stage_process(ephys_stage *st, float *data, int channels, int samples, int64_t first) {
	if (!on_interp_thread)
		return -1;
	if (st->m_process == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	call_begin(st, "process");
	current_stage = st;
	st->block_first = first;
	st->block_samples = samples;
	int rc = 0;
	if (st->shape == NULL || st->shape_ch != channels || st->shape_n != samples) {
		Py_XDECREF(st->shape);
		st->shape = Py_BuildValue("(ii)", channels, samples);
		st->shape_ch = channels;
		st->shape_n = samples;
	}
	PyObject *mv = NULL, *arr = NULL, *res = NULL;
	if (st->shape == NULL)
		goto error;
	mv = PyMemoryView_FromMemory((char *)data, (Py_ssize_t)channels * samples * (Py_ssize_t)sizeof(float), PyBUF_WRITE);
	if (mv == NULL)
		goto error;
	arr = PyObject_CallFunctionObjArgs(np_ndarray, st->shape, np_float32, mv, NULL);
	if (arr == NULL)
		goto error;
	res = PyObject_CallOneArg(st->m_process, arr);
	if (res == NULL)
		goto error;
	Py_DECREF(res);
	goto out;
error:
	keep_error(st);
	rc = 1;
out:
	Py_XDECREF(arr);
	if (mv != NULL) {
		// Anything still holding a view of the block (the script kept
		// `data`) keeps the memoryview alive.
		if (Py_REFCNT(mv) > 1)
			rc |= EPHYS_RETAINED;
		Py_DECREF(mv);
	}
	st->block_samples = 0;
	current_stage = NULL;
	rc |= call_end();
	main_ts = PyEval_SaveThread();
	return rc;
}

int ephys_stage_ttl(ephys_stage *st, int source_node, int line, int state, int64_t sample) {
	if (!on_interp_thread)
		return -1;
	if (st->m_ttl == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	call_begin(st, "handle_ttl_event");
	current_stage = st;
	int rc = 0;
	PyObject *node = PyLong_FromLong(source_node);
	PyObject *chan = NULL;
	if (node != NULL) {
		chan = PyDict_GetItem(channel_names, node); // borrowed
		if (chan == NULL)
			chan = PyUnicode_FromString("TTL");
		else
			Py_INCREF(chan);
	}
	PyObject *sn = PyLong_FromLongLong(sample);
	PyObject *ln = PyLong_FromLong(line);
	PyObject *res = NULL;
	if (node && chan && sn && ln)
		res = PyObject_CallFunctionObjArgs(st->m_ttl, node, chan, sn, ln, state ? Py_True : Py_False, NULL);
	if (res == NULL) {
		keep_error(st);
		rc = 1;
	}
	Py_XDECREF(res);
	Py_XDECREF(node);
	Py_XDECREF(chan);
	Py_XDECREF(sn);
	Py_XDECREF(ln);
	current_stage = NULL;
	rc |= call_end();
	main_ts = PyEval_SaveThread();
	return rc;
}

int ephys_stage_spike(ephys_stage *st, int source_node, const char *electrode, int channels, int samples,
                      int64_t sample, int sorted_id, const float *waveform) {
	if (!on_interp_thread)
		return -1;
	if (st->m_spike == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	call_begin(st, "handle_spike");
	current_stage = st;
	int rc = 0;
	// The waveform is copied into immutable bytes, so the array is read-only
	// and owns its memory.
	PyObject *bytes = PyBytes_FromStringAndSize((const char *)waveform, (Py_ssize_t)channels * samples * sizeof(float));
	PyObject *flat = bytes ? PyObject_CallFunctionObjArgs(np_frombuffer, bytes, np_float32, NULL) : NULL;
	PyObject *arr = flat ? PyObject_CallMethod(flat, "reshape", "(ii)", channels, samples) : NULL;
	PyObject *res = NULL;
	if (arr != NULL)
		res = PyObject_CallFunction(st->m_spike, "isiiLiO", source_node, electrode, channels, samples, (long long)sample,
		                            sorted_id, arr);
	if (res == NULL) {
		keep_error(st);
		rc = 1;
	}
	Py_XDECREF(res);
	Py_XDECREF(arr);
	Py_XDECREF(flat);
	Py_XDECREF(bytes);
	current_stage = NULL;
	rc |= call_end();
	main_ts = PyEval_SaveThread();
	return rc;
}

int ephys_stage_hook(ephys_stage *st, int which, const char *arg) {
	if (!on_interp_thread)
		return -1;
	if (which < 0 || which > 3 || st->m_hooks[which] == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	call_begin(st, hook_names[which]);
	current_stage = st;
	int rc = 0;
	PyObject *res = arg ? PyObject_CallFunction(st->m_hooks[which], "s", arg) : PyObject_CallNoArgs(st->m_hooks[which]);
	if (res == NULL) {
		keep_error(st);
		rc = 1;
	}
	Py_XDECREF(res);
	// Flush partial output lines so hook prints appear promptly.
	PyObject *sys_stdout = PySys_GetObject("stdout");
	if (sys_stdout != NULL) {
		PyObject *r = PyObject_CallMethod(sys_stdout, "flush", NULL);
		Py_XDECREF(r);
		PyErr_Clear();
	}
	current_stage = NULL;
	rc |= call_end();
	main_ts = PyEval_SaveThread();
	return rc;
}

ephys_out_event *ephys_stage_events(ephys_stage *st) { return st->events; }

int ephys_stage_nevents(ephys_stage *st) { return st->nevents; }

int64_t ephys_stage_dropped(ephys_stage *st) { return st->dropped; }

void ephys_stage_events_reset(ephys_stage *st) {
	st->nevents = 0;
	st->dropped = 0;
	ephys_stage_spikes_reset(st);
}

// ---------------------------------------------------------------- spikes out

void ephys_stage_set_block(ephys_stage *st, int64_t first, int samples, int64_t spike_lookback) {
	st->block_first = first;
	st->block_samples = samples;
	st->spike_lookback = spike_lookback;
}

ephys_out_spike *ephys_stage_spikes(ephys_stage *st) { return st->spikes; }

int ephys_stage_nspikes(ephys_stage *st) { return st->nspikes; }

int64_t ephys_stage_spikes_dropped(ephys_stage *st) { return st->spikes_dropped; }

const char *ephys_stage_spike_names(ephys_stage *st) { return st->spike_names; }

const float *ephys_stage_spike_waves(ephys_stage *st) { return st->spike_waves; }

void ephys_stage_spikes_reset(ephys_stage *st) {
	st->nspikes = 0;
	st->spikes_dropped = 0;
	st->spike_names_len = 0;
	st->spike_waves_len = 0;
}
