"""Run argv in a subprocess; kill it if its RSS passes LIMIT GiB; print its peak (ru_maxrss of the child)."""
import os, resource, subprocess, sys, time
LIMIT = float(os.environ.get("LIMIT_GIB", "16.5"))
p = subprocess.Popen(sys.argv[1:])
peak = 0
while p.poll() is None:
    try:
        for line in open(f"/proc/{p.pid}/status"):
            if line.startswith("VmRSS"):
                rss = int(line.split()[1]) / 2**20
                peak = max(peak, rss)
                if rss > LIMIT:
                    p.kill(); print(f"KILLED at {rss:.2f} GiB", flush=True)
    except FileNotFoundError:
        pass
    time.sleep(0.1)
print(f"rc {p.returncode}; polled peak {peak:.2f} GiB; child ru_maxrss {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB")
