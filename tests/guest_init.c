/*
 * /init of the tests' Linux guest (tests/linux_guest.py builds it with
 * `gcc -static -O2`). It fills most of the free memory with pages anyone
 * can recognise and check:
 *
 *   bytes 0..8     "SAVEDIR!"
 *   bytes 8..16    generation (little-endian u64), 0 after the fill
 *   bytes 16..24   the page's index in the fill
 *   word k (3..511) mix(index * 512 + k), XORed with every generation g
 *                  whose word is k (3 + g % 509) once rewriting started
 *
 * then prints "READY <pages>" on the console. With sdmode=rewrite (kernel
 * command line) it then rewrites every page for ever, one generation after
 * the other: the generation word and one more word change, so a live
 * migration sends the pages again and XBZRLE sends small deltas. Otherwise
 * it sleeps. sdfill=MIB fills that many MiB instead of most of the memory.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

int main(void)
{
    struct sysinfo si;
    const char *mode = getenv("sdmode");
    const char *fill = getenv("sdfill");

    sysinfo(&si);
    uint64_t free_bytes = (uint64_t)si.freeram * si.mem_unit;
    uint64_t want = fill ? strtoull(fill, NULL, 10) << 20 : free_bytes - free_bytes / 16 - (16u << 20);
    size_t pages = want / 4096;
    uint64_t *m = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        printf("SAVEDIR cannot map %zu pages\n", pages);
        fflush(stdout);
        for (;;)
            pause();
    }
    for (size_t i = 0; i < pages; i++) {
        uint64_t *p = m + i * 512;
        memcpy(p, "SAVEDIR!", 8);
        p[1] = 0;
        p[2] = i;
        for (int k = 3; k < 512; k++)
            p[k] = mix(i * 512 + k);
    }
    printf("READY %zu\n", pages);
    fflush(stdout);
    if (!mode || strcmp(mode, "rewrite") != 0) {
        for (;;)
            pause();
    }
    for (uint64_t gen = 1;; gen++) {
        for (size_t i = 0; i < pages; i++) {
            uint64_t *p = m + i * 512;
            p[1] = gen;
            p[3 + gen % 509] ^= gen;
        }
    }
}
