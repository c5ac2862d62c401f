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
 *       Prints once per second:  DIRTY t=<s> pass=<n> rate=<MiB/s> bad=<stale pages so far>
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
            if (t - last >= 1.0) {
                printf("DIRTY t=%.0f pass=%" PRIu64 " rate=%.0fMB/s bad=%" PRIu64 "\n", t - t0,
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

static int memsum_write(size_t mib, uint64_t seed) {
    if (mib == 0) {
        fprintf(stderr, "memsum: size must be at least 1 MiB\n");
        return 2;
    }
    unlink(REQ_FIFO);
    unlink(RESP_FIFO);
    if (mkfifo(REQ_FIFO, 0600) || mkfifo(RESP_FIFO, 0600)) {
        perror("memsum: mkfifo");
        return 1;
    }
    int pipefd[2];
    if (pipe(pipefd)) {
        perror("memsum: pipe");
        return 1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("memsum: fork");
        return 1;
    }
    if (pid == 0) {
        close(pipefd[0]);
        setsid();
        signal(SIGHUP, SIG_IGN);
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        _exit(memsum_holder(mib, seed, pipefd[1]));
    }
    close(pipefd[1]);
    char line[256];
    ssize_t n = read(pipefd[0], line, sizeof line - 1);
    if (n <= 0) {
        fprintf(stderr, "memsum: holder died before reporting\n");
        return 1;
    }
    line[n] = 0;
    fputs(line, stdout);
    return strncmp(line, "MEMSUM", 6) == 0 ? 0 : 1;
}

static int memsum_ask(const char *what) {
    int req = open(REQ_FIFO, O_WRONLY | O_NONBLOCK); /* ENXIO: nobody holds the region */
    if (req < 0) {
        fprintf(stderr, "memsum: no holder running (run 'memsum write SIZE_MIB' first)\n");
        return 2;
    }
    fcntl(req, F_SETFL, 0);
    if (write(req, what, strlen(what)) < 0) {
        perror("memsum: write");
        return 1;
    }
    close(req);
    int resp = open(RESP_FIFO, O_RDONLY); /* 'q': the holder's "stopped", once it is gone */
    if (resp < 0) {
        perror("memsum: open");
        return 1;
    }
    char line[256];
    ssize_t n = read(resp, line, sizeof line - 1);
    close(resp);
    if (n <= 0) {
        fprintf(stderr, "memsum: holder gave no answer\n");
        return 1;
    }
    line[n] = 0;
    if (what[0] == 'q')
        return strncmp(line, "MEMSUM stopped", 14) == 0 ? 0 : 1;
    fputs(line, stdout);
    return strstr(line, " ok=1") ? 0 : 1;
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
    fprintf(stderr, "usage: labtools dirtier|memsum|nohup ...\n");
    return 2;
}
