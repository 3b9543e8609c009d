/* Native word count for bench/runtime.py, one file, three modes:
 *
 *   wcnative gen BYTES SEED   writes about BYTES of text: lines of words drawn
 *                             from a 100,000-word vocabulary, Zipf-distributed
 *   wcnative map              stdin: text; stdout: word<TAB>count for every
 *                             distinct word (counted in a hash table: the
 *                             in-mapper combining a real streaming mapper does)
 *   wcnative reduce           stdin: word<TAB>count lines sorted by word;
 *                             stdout: word<TAB>total
 *
 * Words are runs of bytes other than ASCII whitespace, as Python's str.split()
 * sees ASCII text. Build: gcc -O2 -o wcnative runtime_wcnative.c -lm
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t rng_state;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void die(const char *msg) {
    fprintf(stderr, "wcnative: %s\n", msg);
    exit(2);
}

static int gen(long long bytes, uint64_t seed) {
    enum { V = 100000 };
    rng_state = seed;
    static char words[V][16];
    static int lens[V];
    static double cdf[V];
    const char *letters = "etaoinshrdlcumwfgypbvkjxqz";
    for (int i = 0; i < V; i++) {
        int len = 2 + (int)(rnd() % 9);
        for (int k = 0; k < len; k++) {
            /* Common letters more often. */
            uint64_t r = rnd() % 100;
            int idx = r < 60 ? (int)(rnd() % 8) : r < 90 ? 8 + (int)(rnd() % 10) : 18 + (int)(rnd() % 8);
            words[i][k] = letters[idx];
        }
        lens[i] = len;
    }
    double total = 0;
    for (int i = 0; i < V; i++) {
        total += 1.0 / pow(i + 1, 1.05);
        cdf[i] = total;
    }
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap + 4096);
    if (!buf) die("out of memory");
    long long written = 0;
    while (written < bytes) {
        int per_line = 6 + (int)(rnd() % 13);
        for (int w = 0; w < per_line; w++) {
            double u = (double)(rnd() >> 11) / 9007199254740992.0 * total;
            int lo = 0, hi = V - 1;
            while (lo < hi) {
                int mid = (lo + hi) / 2;
                if (cdf[mid] < u) lo = mid + 1; else hi = mid;
            }
            if (w) buf[n++] = ' ';
            memcpy(buf + n, words[lo], lens[lo]);
            n += lens[lo];
        }
        buf[n++] = '\n';
        if (n >= cap) {
            if (fwrite(buf, 1, n, stdout) != n) die("write failed");
            written += n;
            n = 0;
        }
    }
    if (n && fwrite(buf, 1, n, stdout) != n) die("write failed");
    return fflush(stdout) == 0 ? 0 : 1;
}

/* ---- map: a hash table of words ---- */
typedef struct { uint64_t hash; uint32_t off, len; uint64_t count; } slot;
static slot *table;
static size_t table_cap, table_used;
static char *arena;
static size_t arena_len, arena_cap;

static uint64_t fnv(const char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)p[i]; h *= 0x100000001b3ULL; }
    return h | 1; /* 0 marks an empty slot */
}

static void grow(void) {
    size_t ncap = table_cap ? table_cap * 2 : 1 << 16;
    slot *nt = calloc(ncap, sizeof(slot));
    if (!nt) die("out of memory");
    for (size_t i = 0; i < table_cap; i++) {
        if (!table[i].hash) continue;
        size_t j = table[i].hash & (ncap - 1);
        while (nt[j].hash) j = (j + 1) & (ncap - 1);
        nt[j] = table[i];
    }
    free(table);
    table = nt;
    table_cap = ncap;
}

static void add_word(const char *p, size_t n, uint64_t count) {
    if ((table_used + 1) * 2 > table_cap) grow();
    uint64_t h = fnv(p, n);
    size_t j = h & (table_cap - 1);
    while (table[j].hash) {
        if (table[j].hash == h && table[j].len == n && memcmp(arena + table[j].off, p, n) == 0) {
            table[j].count += count;
            return;
        }
        j = (j + 1) & (table_cap - 1);
    }
    if (arena_len + n > arena_cap) {
        arena_cap = (arena_cap + n) * 2;
        arena = realloc(arena, arena_cap);
        if (!arena) die("out of memory");
    }
    memcpy(arena + arena_len, p, n);
    table[j] = (slot){h, (uint32_t)arena_len, (uint32_t)n, count};
    arena_len += n;
    table_used++;
}

static int is_space(unsigned char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

static int map(void) {
    size_t cap = 1 << 20;
    char *buf = malloc(cap * 2);
    if (!buf) die("out of memory");
    size_t carry = 0;
    for (;;) {
        ssize_t got = read(0, buf + carry, cap);
        if (got < 0) die("read failed");
        size_t n = carry + (size_t)got;
        size_t i = 0, start = 0;
        int in_word = 0;
        for (; i < n; i++) {
            if (is_space((unsigned char)buf[i])) {
                if (in_word) { add_word(buf + start, i - start, 1); in_word = 0; }
            } else if (!in_word) { start = i; in_word = 1; }
        }
        if (got == 0) {
            if (in_word) add_word(buf + start, n - start, 1);
            break;
        }
        carry = in_word ? n - start : 0;
        if (carry > cap) die("a word longer than 1 MiB");
        memmove(buf, buf + start, carry);
    }
    for (size_t j = 0; j < table_cap; j++) {
        if (!table[j].hash) continue;
        fwrite(arena + table[j].off, 1, table[j].len, stdout);
        printf("\t%llu\n", (unsigned long long)table[j].count);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}

static int reduce(void) {
    char *line = NULL, *cur = NULL;
    size_t cap = 0, cur_cap = 0;
    ssize_t n;
    unsigned long long total = 0;
    int have = 0;
    while ((n = getline(&line, &cap, stdin)) > 0) {
        if (line[n - 1] == '\n') line[--n] = 0;
        char *tab = memchr(line, '\t', n);
        if (!tab) die("a line without a TAB");
        *tab = 0;
        unsigned long long c = strtoull(tab + 1, NULL, 10);
        if (have && strcmp(cur, line) == 0) { total += c; continue; }
        if (have) printf("%s\t%llu\n", cur, total);
        size_t k = strlen(line) + 1;
        if (k > cur_cap) { cur_cap = k * 2; cur = realloc(cur, cur_cap); if (!cur) die("out of memory"); }
        memcpy(cur, line, k);
        total = c;
        have = 1;
    }
    if (have) printf("%s\t%llu\n", cur, total);
    return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "gen") == 0) return gen(atoll(argv[2]), strtoull(argv[3], NULL, 10));
    if (argc >= 2 && strcmp(argv[1], "map") == 0) return map();
    if (argc >= 2 && strcmp(argv[1], "reduce") == 0) return reduce();
    fprintf(stderr, "usage: wcnative gen BYTES SEED | map | reduce\n");
    return 2;
}
