/* labtools: guest-side oracles for migrator's lab guest. One static multi-call binary.
 *
 *   dirtier SIZE_MIB [RATE_MIB_S [cpu]]
 *       Keeps SIZE_MIB of memory dirty: at the start of every 4 KiB page it stores a 64-bit pass
 *       counter, and before each store it checks that the page still holds the previous pass.
 *       A page whose write was lost (e.g. not re-sent by a migration) shows up as STALE.
 *       RATE_MIB_S limits how many MiB of pages are touched per second (0 or absent: no limit),
 *       by sleeping when ahead of it: the rate holds whatever CPU time the vCPU gets. With
 *       "cpu" it is paced by work instead: a fixed computation per page, calibrated at the start
 *       to RATE_MIB_S, so the rate follows the CPU time the vCPU gets (a compute-bound
 *       workload, what QEMU's auto-converge throttle slows down); prints
 *         PACE cpu loops_per_page=<n> target=<MiB/s>
 *       Prints four times a second:  DIRTY t=<s> pass=<n> rate=<MiB/s> bad=<stale pages so far>
 *       (t: seconds since it started, to 0.01 s; pass: whole passes done so far)
 *       and for the first stale pages:  STALE page=<i> has=<value> want=<value>
 *
 *   memsum write SIZE_MIB [SEED]
 *       Starts a holder process that fills SIZE_MIB with a pattern derived from SEED, keeps it
 *       resident, and prints:  MEMSUM wrote mib=<n> seed=<s> sum=<hex> pid=<pid>
 *   memsum verify
 *       Asks the holder to re-read the whole region; prints
 *         MEMSUM verify sum=<hex> expected=<hex> bad_pages=<n> ok=<0|1>
 *       and exits 0 only if every page still holds its pattern.
 *   memsum stop
 *       Ends the holder.
 *   The holder is reached through two FIFOs in /tmp, so a console command gets a real exit
 *   status. Exit status 2 means "usage error or no holder running".
 *
 *   diskcheck write DEVICE [SIZE_MIB [RATE_MIB_S]]
 *       The disk oracle. Starts a writer process that first reads the first SIZE_MIB
 *       (default 64) of DEVICE and remembers a checksum of each 4 KiB block, then rewrites
 *       those blocks for ever, scattered over the region, each with a stamp (its index and a
 *       sequence number counting every write) and a pattern derived from both, through
 *       O_DIRECT and O_DSYNC: a write counts once the device has it, not the guest's page
 *       cache. It remembers the latest stamp of every block (in guest memory, which migrates
 *       with the VM). RATE_MIB_S limits its writes (0 or absent: as fast as the disk takes
 *       them). Write k (from 0) goes to block k * S mod blocks, S the first number from 7919
 *       on that is coprime to the block count (so every block is written once per round).
 *       Prints:  DISKCHECK started blocks=<n> pid=<pid>
 *   diskcheck verify
 *       The writer stops between two writes and re-reads every block through O_DIRECT: each
 *       must hold its latest stamp and pattern (a block never written: its first checksum).
 *       Prints  DISKCHECK verify blocks=<n> writes=<n> bad=<n> ok=<0|1>  after up to five
 *         DISKCHECK bad block=<i> has=<seq or -> want=<seq or ->
 *       and exits 0 only if every block is right. Writing then goes on.
 *   diskcheck status
 *       Prints  DISKCHECK status blocks=<n> writes=<n>  (no reading).
 *   diskcheck stop
 *       Ends the writer.
 *
 *   nohup COMMAND [ARG...]
 *       Runs COMMAND immune to SIGHUP, output appended to ./nohup.out when stdout is a
 *       terminal (Debian's busybox-static has no nohup applet).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define REQ_FIFO "/tmp/memsum.req"
#define RESP_FIFO "/tmp/memsum.resp"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *alloc_resident(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* ---------------------------------------------------------------- dirtier */

static volatile uint64_t work_sink;

/* Computation that cannot be optimized away: LOOPS steps of an LCG. */
static void work(uint64_t loops) {
    uint64_t x = work_sink;
    for (uint64_t k = 0; k < loops; k++)
        x = x * 6364136223846793005ull + 1442695040888963407ull;
    work_sink = x;
}

/* Loops of work() per page so that pages are touched at RATE MiB/s on this vCPU now. */
static uint64_t calibrate(double rate) {
    uint64_t loops = 1 << 16, done = 0;
    double t0 = now(), t;
    do {
        work(loops);
        done += loops;
        t = now();
    } while (t - t0 < 0.5);
    double per_s = done / (t - t0), pages_per_s = rate * 256;
    uint64_t per_page = (uint64_t)(per_s / pages_per_s);
    return per_page ? per_page : 1;
}

static int dirtier(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: dirtier SIZE_MIB [RATE_MIB_S [cpu]]\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    double rate = argc > 2 ? atof(argv[2]) : 0;
    int paced = argc > 3 && strcmp(argv[3], "cpu") == 0;
    if (argc > 3 && !paced) {
        fprintf(stderr, "dirtier: the third argument is 'cpu' or nothing\n");
        return 2;
    }
    if (paced && rate <= 0) {
        fprintf(stderr, "dirtier: 'cpu' pacing needs a rate\n");
        return 2;
    }
    size_t bytes = mib << 20, npages = bytes / PAGE;
    if (npages == 0) {
        fprintf(stderr, "dirtier: size must be at least 1 MiB\n");
        return 2;
    }
    unsigned char *buf = alloc_resident(bytes);
    if (!buf) {
        perror("dirtier: mmap");
        return 1;
    }
    for (size_t i = 0; i < npages; i++)
        *(volatile uint64_t *)(buf + i * PAGE) = 0;

    uint64_t pass = 0, bad = 0, touched = 0, touched_at_report = 0, per_page = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (paced) {
        per_page = calibrate(rate);
        printf("PACE cpu loops_per_page=%" PRIu64 " target=%.0fMB/s\n", per_page, rate);
    }
    double t0 = now(), last = t0;
    size_t i = 0;
    for (;;) {
        volatile uint64_t *w = (volatile uint64_t *)(buf + i * PAGE);
        uint64_t has = *w;
        if (has != pass) {
            if (bad < 5)
                printf("STALE page=%zu has=%" PRIu64 " want=%" PRIu64 "\n", i, has, pass);
            bad++;
        }
        *w = pass + 1;
        touched++;
        if (per_page)
            work(per_page);
        if (++i == npages) {
            i = 0;
            pass++;
        }
        if ((touched & 255) == 0) { /* every MiB touched */
            double t = now();
            if (rate > 0 && !paced)
                while (touched > rate * 256 * (t - t0)) {
                    usleep(2000);
                    t = now();
                }
            if (t - last >= 0.25) {
                printf("DIRTY t=%.2f pass=%" PRIu64 " rate=%.0fMB/s bad=%" PRIu64 "\n", t - t0,
                       pass, (touched - touched_at_report) / 256.0 / (t - last), bad);
                last = t;
                touched_at_report = touched;
            }
        }
    }
}

/* ---------------------------------------------------------------- memsum */

static uint64_t pattern(uint64_t seed, uint64_t index) { /* splitmix64 of (seed, index) */
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 1;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t checksum(const uint64_t *words, size_t n) { /* FNV-1a over the words */
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= words[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static int memsum_holder(size_t mib, uint64_t seed, int report_fd) {
    size_t bytes = mib << 20, nwords = bytes / 8, words_per_page = PAGE / 8;
    uint64_t *buf = alloc_resident(bytes);
    if (!buf) {
        dprintf(report_fd, "ERROR mmap failed: %s\n", strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < nwords; i++)
        buf[i] = pattern(seed, i);
    uint64_t expected = checksum(buf, nwords);
    /* The request FIFO is held open (read and write: it never reads end-of-file) from before
     * the report on: a client opens it non-blocking for writing, which fails (ENXIO) whenever
     * no reader has it open. Opened per request, it had no reader between the report and the
     * first open, and between two requests: a 'memsum verify' right after 'memsum write'
     * then said "no holder running" (seen once in the suite, test_guest). */
    int req = open(REQ_FIFO, O_RDWR);
    if (req < 0) {
        dprintf(report_fd, "ERROR open %s: %s\n", REQ_FIFO, strerror(errno));
        return 1;
    }
    dprintf(report_fd, "MEMSUM wrote mib=%zu seed=%" PRIu64 " sum=%016" PRIx64 " pid=%d\n", mib,
            seed, expected, (int)getpid());
    close(report_fd);
    for (;;) {
        char cmd[16] = {0};
        ssize_t n = read(req, cmd, sizeof cmd - 1);
        if (n <= 0)
            continue;
        if (cmd[0] == 'q') {
            /* gone before the client's 'memsum stop' returns: a 'memsum write' right after
             * it makes new FIFOs, which a holder still unlinking would remove */
            int resp = open(RESP_FIFO, O_WRONLY);
            unlink(REQ_FIFO);
            unlink(RESP_FIFO);
            if (resp >= 0) {
                dprintf(resp, "MEMSUM stopped\n");
                close(resp);
            }
            return 0;
        }
        uint64_t sum = checksum(buf, nwords), bad = 0;
        for (size_t p = 0; p < nwords / words_per_page; p++)
            for (size_t w = 0; w < words_per_page; w++)
                if (buf[p * words_per_page + w] != pattern(seed, p * words_per_page + w)) {
                    bad++;
                    break;
                }
        int resp = open(RESP_FIFO, O_WRONLY);
        if (resp < 0)
            continue;
        dprintf(resp, "MEMSUM verify sum=%016" PRIx64 " expected=%016" PRIx64
                      " bad_pages=%" PRIu64 " ok=%d\n",
                sum, expected, bad, sum == expected && bad == 0);
        close(resp);
    }
}

/* Start BODY(ARG, report_fd) in a detached process that serves the FIFO pair REQ/RESP (made
 * afresh here); print the one line it reports on report_fd first, and succeed when that line
 * starts with TAG (the tool's answer, not an error). */
static int spawn_holder(const char *tool, const char *req, const char *resp, const char *tag,
                        int (*body)(void *arg, int report_fd), void *arg) {
    unlink(req);
    unlink(resp);
    if (mkfifo(req, 0600) || mkfifo(resp, 0600)) {
        fprintf(stderr, "%s: mkfifo: %s\n", tool, strerror(errno));
        return 1;
    }
    int pipefd[2];
    if (pipe(pipefd)) {
        fprintf(stderr, "%s: pipe: %s\n", tool, strerror(errno));
        return 1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "%s: fork: %s\n", tool, strerror(errno));
        return 1;
    }
    if (pid == 0) {
        close(pipefd[0]);
        setsid();
        signal(SIGHUP, SIG_IGN);
        signal(SIGPIPE, SIG_IGN); /* an asker gone before its answer: not the holder's end */
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        _exit(body(arg, pipefd[1]));
    }
    close(pipefd[1]);
    char line[256];
    ssize_t n = read(pipefd[0], line, sizeof line - 1);
    if (n <= 0) {
        fprintf(stderr, "%s: holder died before reporting\n", tool);
        return 1;
    }
    line[n] = 0;
    fputs(line, stdout);
    return strncmp(line, tag, strlen(tag)) == 0 ? 0 : 1;
}

struct memsum_args {
    size_t mib;
    uint64_t seed;
};

static int memsum_body(void *arg, int report_fd) {
    struct memsum_args *a = arg;
    return memsum_holder(a->mib, a->seed, report_fd);
}

static int memsum_write(size_t mib, uint64_t seed) {
    if (mib == 0) {
        fprintf(stderr, "memsum: size must be at least 1 MiB\n");
        return 2;
    }
    struct memsum_args a = {mib, seed};
    return spawn_holder("memsum", REQ_FIFO, RESP_FIFO, "MEMSUM", memsum_body, &a);
}

/* Send WHAT to the process holding the FIFO pair REQ/RESP and print its one-line answer;
 * exit status 0 when the answer says ok=1 (or, for 'q', that it stopped). */
static int ask(const char *tool, const char *req_path, const char *resp_path, const char *what,
               const char *absent) {
    int req = open(req_path, O_WRONLY | O_NONBLOCK); /* ENXIO: nobody holds the FIFO */
    if (req < 0) {
        fprintf(stderr, "%s: %s\n", tool, absent);
        return 2;
    }
    fcntl(req, F_SETFL, 0);
    if (write(req, what, strlen(what)) < 0) {
        fprintf(stderr, "%s: write: %s\n", tool, strerror(errno));
        return 1;
    }
    close(req);
    int resp = open(resp_path, O_RDONLY); /* 'q': the holder's "stopped", once it is gone */
    if (resp < 0) {
        fprintf(stderr, "%s: open: %s\n", tool, strerror(errno));
        return 1;
    }
    char line[1024];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof line - 1 && (n = read(resp, line + got, sizeof line - 1 - got)) > 0)
        got += n;
    close(resp);
    if (got == 0) {
        fprintf(stderr, "%s: no answer\n", tool);
        return 1;
    }
    line[got] = 0;
    if (what[0] == 'q')
        return strstr(line, " stopped") ? 0 : 1;
    fputs(line, stdout);
    if (what[0] == 'v') /* a verify passes on its own answer saying so, nothing else */
        return strstr(line, " verify ") && strstr(line, " ok=1") ? 0 : 1;
    return strstr(line, " status ") ? 0 : 1;
}

static int memsum_ask(const char *what) {
    return ask("memsum", REQ_FIFO, RESP_FIFO, what,
               "no holder running (run 'memsum write SIZE_MIB' first)");
}

static int memsum(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "write") == 0)
        return memsum_write(strtoul(argv[2], NULL, 10),
                            argc > 3 ? strtoull(argv[3], NULL, 10) : 1);
    if (argc == 2 && strcmp(argv[1], "verify") == 0)
        return memsum_ask("v\n");
    if (argc == 2 && strcmp(argv[1], "stop") == 0)
        return memsum_ask("q\n");
    fprintf(stderr, "usage: memsum write SIZE_MIB [SEED] | memsum verify | memsum stop\n");
    return 2;
}

/* ---------------------------------------------------------------- diskcheck */

#define DISK_REQ "/tmp/diskcheck.req"
#define DISK_RESP "/tmp/diskcheck.resp"
#define DISK_MAGIC 0x31304b4843534b44ull /* "DKSCHK01" */
#define NEVER UINT64_MAX
#define DISK_ABSENT "no writer running (run 'diskcheck write DEVICE' first)"

struct disk {
    int fd;
    size_t blocks;
    uint64_t *latest;  /* latest stamp written to each block, NEVER: not written */
    uint64_t *initial; /* checksum of each block as found at the start */
    uint64_t writes;
    uint64_t *buf;     /* one aligned block */
};

static size_t gcd(size_t a, size_t b) {
    while (b) {
        size_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static void disk_fill(uint64_t *w, uint64_t index, uint64_t seq) {
    w[0] = DISK_MAGIC;
    w[1] = index;
    w[2] = seq;
    for (size_t k = 3; k < PAGE / 8; k++)
        w[k] = pattern(seq, index * (PAGE / 8) + k);
}

/* Re-read every block; report to FD. Returns the number of bad blocks. */
static uint64_t disk_verify(struct disk *d, int fd) {
    uint64_t bad = 0, *expect = malloc(PAGE);
    if (!expect) {
        dprintf(fd, "DISKCHECK verify blocks=%zu writes=%" PRIu64 " bad=? ok=0 (out of memory)\n",
                d->blocks, d->writes);
        return 1;
    }
    for (size_t i = 0; i < d->blocks; i++) {
        int ok;
        if (pread(d->fd, d->buf, PAGE, (off_t)i * PAGE) != PAGE)
            ok = 0;
        else if (d->latest[i] == NEVER)
            ok = checksum(d->buf, PAGE / 8) == d->initial[i];
        else {
            disk_fill(expect, i, d->latest[i]);
            ok = memcmp(d->buf, expect, PAGE) == 0;
        }
        if (!ok) {
            if (bad < 5) {
                char has[32] = "-", want[32] = "-";
                if (d->buf[0] == DISK_MAGIC && d->buf[1] == i)
                    snprintf(has, sizeof has, "%" PRIu64, d->buf[2]);
                if (d->latest[i] != NEVER)
                    snprintf(want, sizeof want, "%" PRIu64, d->latest[i]);
                dprintf(fd, "DISKCHECK bad block=%zu has=%s want=%s\n", i, has, want);
            }
            bad++;
        }
    }
    free(expect);
    dprintf(fd, "DISKCHECK verify blocks=%zu writes=%" PRIu64 " bad=%" PRIu64 " ok=%d\n",
            d->blocks, d->writes, bad, bad == 0);
    return bad;
}

static int disk_writer(struct disk *d, double rate, int report_fd) {
    int req = open(DISK_REQ, O_RDWR | O_NONBLOCK); /* held open: see memsum_holder */
    if (req < 0) {
        dprintf(report_fd, "ERROR open %s: %s\n", DISK_REQ, strerror(errno));
        return 1;
    }
    dprintf(report_fd, "DISKCHECK started blocks=%zu pid=%d\n", d->blocks, (int)getpid());
    close(report_fd);
    /* scattered: block k of each round is k * stride mod blocks, stride coprime to blocks */
    size_t stride = 7919;
    while (gcd(stride, d->blocks) != 1)
        stride++;
    double t0 = now();
    for (size_t k = 0;;) {
        char cmd[16];
        ssize_t n = read(req, cmd, sizeof cmd - 1);
        if (n > 0) {
            int resp = open(DISK_RESP, O_WRONLY);
            if (cmd[0] == 'q') {
                unlink(DISK_REQ);
                unlink(DISK_RESP);
                if (resp >= 0)
                    dprintf(resp, "DISKCHECK stopped\n");
                return 0;
            }
            if (resp >= 0) {
                if (cmd[0] == 'v')
                    disk_verify(d, resp);
                else
                    dprintf(resp, "DISKCHECK status blocks=%zu writes=%" PRIu64 "\n", d->blocks,
                            d->writes);
                close(resp);
            }
        }
        if (rate > 0 && d->writes > rate * 256 * (now() - t0)) {
            usleep(2000); /* ahead of the rate: requests are still answered meanwhile */
            continue;
        }
        size_t i = (k * stride) % d->blocks;
        uint64_t seq = d->writes + 1;
        disk_fill(d->buf, i, seq);
        if (pwrite(d->fd, d->buf, PAGE, (off_t)i * PAGE) != PAGE) {
            usleep(100000); /* a failing device: retried, the block keeps its old stamp */
            continue;
        }
        d->latest[i] = seq;
        d->writes = seq;
        k = (k + 1) % d->blocks;
    }
}

struct writer_args {
    struct disk *d;
    double rate;
};

static int writer_body(void *arg, int report_fd) {
    struct writer_args *a = arg;
    return disk_writer(a->d, a->rate, report_fd);
}

static int diskcheck_write(const char *dev, size_t mib, double rate) {
    int running = open(DISK_REQ, O_WRONLY | O_NONBLOCK); /* a writer holds it open */
    if (running >= 0) {
        close(running);
        fprintf(stderr, "diskcheck: a writer is running already ('diskcheck stop' first)\n");
        return 2;
    }
    struct disk d = {0};
    d.fd = open(dev, O_RDWR | O_DIRECT | O_DSYNC);
    if (d.fd < 0) {
        fprintf(stderr, "diskcheck: %s: %s\n", dev, strerror(errno));
        return 1;
    }
    off_t size = lseek(d.fd, 0, SEEK_END);
    if (size < (off_t)(mib << 20)) {
        fprintf(stderr, "diskcheck: %s holds %lld bytes, less than %zu MiB\n", dev,
                (long long)size, mib);
        return 2;
    }
    d.blocks = (mib << 20) / PAGE;
    d.latest = malloc(d.blocks * 8);
    d.initial = malloc(d.blocks * 8);
    if (!d.latest || !d.initial || posix_memalign((void **)&d.buf, PAGE, PAGE)) {
        fprintf(stderr, "diskcheck: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < d.blocks; i++) {
        if (pread(d.fd, d.buf, PAGE, (off_t)i * PAGE) != PAGE) {
            fprintf(stderr, "diskcheck: reading block %zu: %s\n", i, strerror(errno));
            return 1;
        }
        d.initial[i] = checksum(d.buf, PAGE / 8);
        d.latest[i] = NEVER;
    }
    struct writer_args a = {&d, rate};
    return spawn_holder("diskcheck", DISK_REQ, DISK_RESP, "DISKCHECK", writer_body, &a);
}

static int diskcheck(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "write") == 0) {
        size_t mib = argc > 3 ? strtoul(argv[3], NULL, 10) : 64;
        if (mib == 0) {
            fprintf(stderr, "diskcheck: size must be at least 1 MiB\n");
            return 2;
        }
        return diskcheck_write(argv[2], mib, argc > 4 ? atof(argv[4]) : 0);
    }
    if (argc == 2 && strcmp(argv[1], "verify") == 0)
        return ask("diskcheck", DISK_REQ, DISK_RESP, "v\n", DISK_ABSENT);
    if (argc == 2 && strcmp(argv[1], "status") == 0)
        return ask("diskcheck", DISK_REQ, DISK_RESP, "s\n", DISK_ABSENT);
    if (argc == 2 && strcmp(argv[1], "stop") == 0)
        return ask("diskcheck", DISK_REQ, DISK_RESP, "q\n", DISK_ABSENT);
    fprintf(stderr, "usage: diskcheck write DEVICE [SIZE_MIB [RATE_MIB_S]] | diskcheck verify | "
                    "diskcheck status | diskcheck stop\n");
    return 2;
}

static int nohup(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: nohup COMMAND [ARG...]\n");
        return 127;
    }
    /* Named after COMMAND from here on, before its exec: a job started with
     * 'nohup dd ... &' is found by 'killall -0 dd' as soon as it runs at all. With one vCPU
     * the shell may read its next line while the job is between its two execs (this one,
     * then COMMAND's); 'killall -0 dd' then found no dd (test_seed, now and then, with
     * sched_child_runs_first on). */
    const char *base = strrchr(argv[1], '/');
    prctl(PR_SET_NAME, base ? base + 1 : argv[1], 0, 0, 0);
    signal(SIGHUP, SIG_IGN);
    if (isatty(1)) {
        int fd = open("nohup.out", O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd < 0) {
            perror("nohup: nohup.out");
            return 127;
        }
        dup2(fd, 1);
        close(fd);
    }
    if (isatty(2))
        dup2(1, 2);
    execvp(argv[1], argv + 1);
    fprintf(stderr, "nohup: %s: %s\n", argv[1], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}

int main(int argc, char **argv) {
    const char *name = strrchr(argv[0], '/');
    name = name ? name + 1 : argv[0];
    if (strcmp(name, "labtools") == 0 && argc > 1) {
        argv++;
        argc--;
        name = argv[0];
    }
    if (strcmp(name, "dirtier") == 0)
        return dirtier(argc, argv);
    if (strcmp(name, "memsum") == 0)
        return memsum(argc, argv);
    if (strcmp(name, "nohup") == 0)
        return nohup(argc, argv);
    if (strcmp(name, "diskcheck") == 0)
        return diskcheck(argc, argv);
    fprintf(stderr, "usage: labtools dirtier|memsum|diskcheck|nohup ...\n");
    return 2;
}
