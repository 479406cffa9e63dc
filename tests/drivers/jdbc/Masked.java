// The PostgreSQL JDBC driver under a scope that masks people.ssn (partial(0, 4)) and
// people.name (redact), run as a single-file program from tests/drivers.rs:
//   java -cp /usr/share/java/postgresql.jar Masked.java
// Server-prepared statements (binary transfer after the first execution), the simple protocol
// and COPY all return masked values; a masked column in WHERE is refused. Prints "ok <name>" per
// check and "done"; exits non-zero at the first failure.

import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.Properties;

import org.postgresql.PGConnection;

public class Masked {
    static void check(String name, boolean cond, String detail) {
        if (!cond) {
            System.out.println("FAIL " + name + " " + detail);
            System.exit(1);
        }
        System.out.println("ok " + name);
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + System.getenv("PGHOST") + ":" + System.getenv("PGPORT") + "/" + System.getenv("PGDATABASE");
        for (String mode : new String[] {"extended", "simple"}) {
            Properties p = new Properties();
            p.setProperty("user", System.getenv("PGUSER"));
            p.setProperty("password", System.getenv("PGPASSWORD"));
            p.setProperty("sslmode", "verify-full");
            p.setProperty("sslrootcert", System.getenv("PGSSLROOTCERT"));
            p.setProperty("preferQueryMode", mode);
            p.setProperty("prepareThreshold", "1");
            try (Connection c = DriverManager.getConnection(url, p)) {
                for (int run = 1; run <= 3; run++) {
                    try (PreparedStatement st = c.prepareStatement("SELECT * FROM people WHERE id = ?")) {
                        st.setInt(1, 1);
                        try (ResultSet rs = st.executeQuery()) {
                            check(mode + " row #" + run, rs.next(), "no row");
                            String name = rs.getString("name"), ssn = rs.getString("ssn");
                            check(mode + " masked #" + run, "[redacted]".equals(name) && "*******1111".equals(ssn), name + " " + ssn);
                            check(mode + " columns #" + run, rs.getMetaData().getColumnCount() == 3, "" + rs.getMetaData().getColumnCount());
                        }
                    }
                }
                StringWriter out = new StringWriter();
                c.unwrap(PGConnection.class).getCopyAPI().copyOut("COPY people TO STDOUT", out);
                check(mode + " copy masked", out.toString().contains("*******2222") && !out.toString().contains("222-22"), out.toString());
                try {
                    c.createStatement().executeQuery("SELECT id FROM people ORDER BY ssn");
                    check(mode + " order by refused", false, "a masked column sorted");
                } catch (SQLException e) {
                    check(mode + " order by refused", "42501".equals(e.getSQLState()) && e.getMessage().contains("masked column ssn"), e.getMessage());
                }
            }
        }
        System.out.println("done");
    }
}
