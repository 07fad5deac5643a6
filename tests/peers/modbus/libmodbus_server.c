/* A Modbus TCP server built on libmodbus: holding registers 0..9 hold 0x4C42 ("LB"), 1, 2, ...
 * libmodbus has no Read Device Identification, so it answers 0x2B with IllegalFunction:
 * the negative peer for "a unit that exists but cannot identify itself".
 * Usage: modbus-libmodbus-server <ip> <port>. Serves one connection at a time, forever. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <modbus.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <ip> <port>\n", argv[0]);
        return 2;
    }
    modbus_t *ctx = modbus_new_tcp(argv[1], atoi(argv[2]));
    modbus_mapping_t *map = modbus_mapping_new(16, 16, 16, 16);
    if (ctx == NULL || map == NULL) {
        fprintf(stderr, "setup failed: %s\n", modbus_strerror(errno));
        return 1;
    }
    map->tab_registers[0] = 0x4C42;
    for (int i = 1; i < 10; i++)
        map->tab_registers[i] = (uint16_t)i;
    map->tab_input_registers[0] = 0x1234;
    int server = modbus_tcp_listen(ctx, 4);
    if (server < 0) {
        fprintf(stderr, "listen failed: %s\n", modbus_strerror(errno));
        return 1;
    }
    printf("serving\n");
    fflush(stdout);
    for (;;) {
        if (modbus_tcp_accept(ctx, &server) < 0)
            continue;
        uint8_t query[MODBUS_TCP_MAX_ADU_LENGTH];
        for (;;) {
            int rc = modbus_receive(ctx, query);
            if (rc > 0)
                modbus_reply(ctx, query, rc, map);
            else if (rc < 0)
                break;
        }
        close(modbus_get_socket(ctx));
    }
}
